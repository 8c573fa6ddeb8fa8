"""The Pulsar side of a RecommenderSystem: tenant, namespace and topics with their policies."""

from __future__ import annotations

from dataclasses import dataclass

from recsys_operator.api.recommender_system import TopicSpec
from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.render.naming import TOPIC_NAMES, pulsar_namespace


@dataclass(frozen=True)
class TopicPolicy:
    name: str  # short name inside the namespace, e.g. "interactions"
    partitions: int
    retention_minutes: int
    retention_size_mb: int
    backlog_quota_mb: int


@dataclass(frozen=True)
class TopicPlan:
    """Everything the operator makes sure exists in Pulsar for one system."""

    tenant: str
    namespace: str
    topics: tuple[TopicPolicy, ...]

    def topic_url(self, topic: TopicPolicy) -> str:
        return f"persistent://{self.tenant}/{self.namespace}/{topic.name}"


def _policy(name: str, spec: TopicSpec) -> TopicPolicy:
    return TopicPolicy(
        name, spec.partitions, spec.retention_minutes, spec.retention_size_mb, spec.backlog_quota_mb
    )


def topic_plan(system: RecommenderSystem) -> TopicPlan:
    topics = system.spec.events.topics
    return TopicPlan(
        tenant=system.spec.events.tenant,
        namespace=pulsar_namespace(system),
        topics=(
            _policy(TOPIC_NAMES["interactions"], topics.interactions),
            _policy(TOPIC_NAMES["impressions"], topics.impressions),
            _policy(TOPIC_NAMES["dead_letter"], topics.dead_letter),
        ),
    )
