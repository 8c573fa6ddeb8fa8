"""Subscribing a batch consumer to the interactions topic, as every stream job does.

One place for the consumer settings the jobs share (earliest position for a new
subscription, a receive queue of at least two batches, batch receive by size and wait)
and for the retries: a broker still releasing a killed consumer of the subscription, or
briefly overloaded, answers a subscribe late, which is no reason to crash.
"""

from __future__ import annotations

import logging
import time

import pulsar

from recsys_contracts.feature_job_settings import SubscriptionType

log = logging.getLogger("stream_jobs.subscription")

CONSUMER_TYPES = {
    SubscriptionType.KEY_SHARED: pulsar.ConsumerType.KeyShared,
    SubscriptionType.FAILOVER: pulsar.ConsumerType.Failover,
    SubscriptionType.SHARED: pulsar.ConsumerType.Shared,
}


def subscribe_batches(
    client: pulsar.Client,
    topics: str | list[str],
    subscription: str,
    subscription_type: SubscriptionType,
    *,
    batch_size: int,
    batch_wait_ms: int,
    attempts: int,
    max_delay_s: float,
) -> pulsar.Consumer:
    """A consumer of `topics` that receives up to `batch_size` messages per
    `batch_receive`, retrying a subscribe that times out `attempts` times in all,
    waiting 1 s, then twice as long each time up to `max_delay_s`."""
    delay = 1.0
    for attempt in range(1, attempts + 1):
        try:
            return client.subscribe(
                topics,
                subscription,
                consumer_type=CONSUMER_TYPES[subscription_type],
                initial_position=pulsar.InitialPosition.Earliest,
                receiver_queue_size=max(1000, 2 * batch_size),
                batch_receive_policy=pulsar.ConsumerBatchReceivePolicy(
                    batch_size, -1, max(1, batch_wait_ms)
                ),
            )
        except pulsar.Timeout:
            if attempt == attempts:
                raise
            log.warning("subscribing timed out (attempt %d); retrying in %.0fs", attempt, delay)
            time.sleep(delay)
            delay = min(delay * 2, max_delay_s)
    raise AssertionError("unreachable")
