"""The local system's supervisor: starts every part on 127.0.0.1, drives rollouts,
reports in state.json, and stops everything it started.

`recsys up` runs it as a detached process (`python -m recsys_operator.local.supervisor
RUN_DIR`), or in the foreground with `--foreground`. Start order follows the data:
broker and store, the stable model server, then the feature job and the gateway that
depend on them, then Prometheus scraping them. A part that fails to start is reported
with its log tail and everything already started is stopped.

Afterwards, every tick it probes every part and restarts those that died or hung
(`liveness`), re-reads the desired state
(system.yaml), starts or finishes a retraining run when spec.training asks for one
(`retraining`), drives the rollout one step with the operator's own driver
(`recsys_operator.rollout.driver`) against the local Prometheus and the local traffic
router (model servers, routing file), and writes state.json.

Each job is a part of its own: `parts` (process lifecycle), `desired_state` (reload),
`retraining` (runs and their verdicts), `rollout` (driving), `traffic` (routing writes), `scrape_targets` (Prometheus) and
`report` (state.json). This module only wires them together, in that order.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys_operator.api.resources import RecommenderSystem
from recsys_operator.launchers.process import LOOPBACK
from recsys_operator.launchers.prometheus import prometheus_url
from recsys_operator.launchers.pulsar_broker import broker_process, service_url
from recsys_operator.launchers.redis_server import redis_cluster, redis_process, redis_url
from recsys_operator.local.desired_state import DesiredState, ManifestError, parse_system
from recsys_operator.local.parts import Parts
from recsys_operator.local.report import Phase, Report
from recsys_operator.local.retraining import DEFAULT_EVERY_S, LocalTraining
from recsys_operator.local.rollout import LocalRollout
from recsys_operator.local.run_folder import RunFolder
from recsys_operator.local.scrape_targets import ScrapeTargets
from recsys_operator.local.traffic import LocalRouter, ModelServers
from recsys_operator.render.naming import TOPIC_NAMES, system_id, topic_url

log = logging.getLogger("recsys.local")

TICK_S = 1.0


@dataclass
class Options:
    features: bool = True
    """Run the stream feature job (off: static user state, for the value-of-real-time benchmark)."""
    redis_cluster: bool = False
    """The feature store is a Redis Cluster of three primaries instead of one redis-server."""
    retrain_every_s: float | None = DEFAULT_EVERY_S
    """With spec.training: seconds between retraining runs (None: no runs)."""


@dataclass
class LocalSystem:
    folder: RunFolder
    options: Options = field(default_factory=Options)
    desired: DesiredState | None = None
    rollout: LocalRollout | None = None

    def __post_init__(self) -> None:
        self.report = Report(self.folder)
        record = self.report.record
        self.training = LocalTraining(self.folder, self.options.retrain_every_s, record)
        self.targets = ScrapeTargets(self.folder)
        self.servers = ModelServers(self.folder, on_change=self._servers_changed)
        self.parts = Parts(self.folder, self.servers, record, on_change=self.write_state)
        self.router = LocalRouter(
            self.folder.routing, self.servers, record, on_routed=self.write_state
        )

    def _servers_changed(self) -> None:
        self.targets.write_model_servers(self.servers)
        self.write_state()

    # -- start -----------------------------------------------------------------

    def start(self) -> None:
        self.desired = desired = DesiredState(self.folder.manifest)
        topics = parse_system(desired.body).spec.events.topics
        partitions = max(topics.interactions.partitions, topics.impressions.partitions)
        pulsar = self.parts.start(
            "pulsar", broker_process(self.folder.root, default_partitions=partitions)
        )
        store_url, store_mode = self._start_store()
        system = desired.localize(
            pulsar_url=service_url(pulsar), redis_url=store_url, redis_mode=store_mode
        )
        version = system.spec.model.version
        self.rollout = LocalRollout(self.folder, self.router, version, self.report.record)
        self.servers.ensure(system, version)
        self.router.write(system, self.rollout.plan(system))
        targets = [f"{LOOPBACK}:{self.parts.start_gateway().port}"]
        if self.options.features:
            targets.append(f"{LOOPBACK}:{self.parts.start_feature_job(system).port}")
        targets.append(f"{LOOPBACK}:{self.parts.start_event_log(system).port}")
        self.targets.write_model_servers(self.servers)
        prometheus = self.parts.start("prometheus", self.targets.prometheus(targets))
        self.rollout.use_prometheus(prometheus_url(prometheus))
        self.report.phase = Phase.RUNNING
        self.report.record("Started", f"serving version {version}")

    def _start_store(self) -> tuple[str, str]:
        """One redis-server, or (`--redis-cluster`) three joined as a Redis Cluster, each
        node a part of its own (restarted alone: it rejoins from its nodes.conf)."""
        if not self.options.redis_cluster:
            return redis_url(self.parts.start("redis", redis_process(self.folder.root))), "single"
        cluster = redis_cluster(self.folder.root)
        for n, node in enumerate(cluster.nodes):
            self.parts.start(f"redis-{n}", node)
        cluster.join()
        return cluster.url, "cluster"

    # -- the loop ----------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Tick until `stop` is set."""
        while not stop.wait(TICK_S):
            try:
                self.step()
            except Exception as exc:  # a bad tick is reported; the next one retries
                log.exception("tick failed")
                self.report.record("TickFailed", str(exc), warning=True)
            self.write_state()

    def step(self) -> None:
        assert self.desired is not None and self.rollout is not None
        desired, rollout = self.desired, self.rollout
        serving = self.training.serving(desired.system)
        self.parts.restart_failed(
            serving, reroute=lambda: self.router.write(serving, rollout.plan(serving))
        )
        self._reload_desired_state(desired)
        self.training.collect(desired.system)
        # With autoRollout, a passing candidate takes spec.model's place (the operator's
        # rule): the rollout canaries it as it would a version a person set.
        serving = self.training.serving(desired.system)
        self.training.start_when_due(
            desired.system, rollout.state.stable_version, rolling_out=_rolling_out(rollout, serving)
        )
        rollout.step(serving)

    def _reload_desired_state(self, desired: DesiredState) -> None:
        old = desired.system.spec.model.version
        try:
            system = desired.reload()
        except (ManifestError, OSError, ValueError) as exc:
            self.report.record(
                "InvalidSpec",
                f"system.yaml ignored, keeping the last good one: {exc}",
                warning=True,
            )
            return
        if system is None:
            return
        new = system.spec.model.version
        self.router.retry(new)
        if new != old:
            self.report.record("SpecChanged", f"model version {old} -> {new}")

    # -- stop ---------------------------------------------------------------------

    def stop(self) -> None:
        """Stop everything this supervisor started, in reverse start order."""
        self.report.phase = Phase.STOPPING
        self.write_state()
        self.training.stop()
        self.parts.stop()
        self.report.phase = Phase.STOPPED if self.report.error is None else Phase.FAILED
        self.write_state()

    # -- reporting --------------------------------------------------------------------

    def write_state(self) -> None:
        self.report.write(self._document)

    def _document(self) -> dict[str, Any]:
        system = self.desired.localized if self.desired else None
        serving = self.training.serving(system) if system else None
        return self.report.document(
            system=system_id(system) if system else None,
            desired_version=serving.spec.model.version if serving else None,
            parts=self.parts.all(),
            given_up=self.parts.given_up,
            unhealthy=self.parts.liveness.unhealthy(),
            urls=self._urls(),
            topics={k: topic_url(system, v) for k, v in TOPIC_NAMES.items()} if system else {},
            rollout=self.rollout.describe() if self.rollout else None,
            training=self.training.describe() if system and system.spec.training else None,
        )

    def _urls(self) -> dict[str, str]:
        processes = self.parts.processes
        urls = {}
        if "gateway" in processes:
            urls["gateway"] = f"http://{LOOPBACK}:{processes['gateway'].port}"
        if "prometheus" in processes:
            urls["prometheus"] = prometheus_url(processes["prometheus"])
        if "pulsar" in processes:
            urls["pulsar"] = service_url(processes["pulsar"])
        if "redis" in processes:
            urls["redis"] = redis_url(processes["redis"])
        elif "redis-0" in processes:  # a cluster: any node's URL is the endpoint
            urls["redis-cluster"] = redis_url(processes["redis-0"])
        for version, server in self.servers.by_version.items():
            urls[f"torchserve-{version}"] = server.predictions_url(version)
        return urls


def _rolling_out(rollout: LocalRollout, serving: RecommenderSystem) -> bool:
    """A canary is being analysed, or the version to serve differs from the stable and
    its rollout has not been decided yet (it starts with the next step)."""
    state = rollout.state
    version = serving.spec.model.version
    decided = state.last_rollout is not None and state.last_rollout.version == version
    return state.canary is not None or (version != state.stable_version and not decided)


def supervise(folder: RunFolder, options: Options, stop: threading.Event) -> int:
    """Start, run until `stop`, stop. Returns the process exit code."""
    system = LocalSystem(folder, options)
    system.write_state()
    try:
        system.start()
    except Exception as exc:
        system.report.error = str(exc)
        system.report.record("StartFailed", str(exc).splitlines()[0], warning=True)
        log.error("start failed: %s", exc)
        system.stop()
        return 1
    system.write_state()
    try:
        system.run(stop)
    finally:
        system.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if not args:
        print(
            "usage: python -m recsys_operator.local.supervisor RUN_DIR [--no-features] "
            "[--redis-cluster] [--retrain-every SECONDS]",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    options = Options(
        features="--no-features" not in args,
        redis_cluster="--redis-cluster" in args,
        retrain_every_s=_retrain_every(args),
    )
    return supervise(RunFolder(Path(args[0]).resolve()), options, stop)


def _retrain_every(args: list[str]) -> float | None:
    """`--retrain-every SECONDS` (0: no runs); the default when it is not given."""
    if "--retrain-every" not in args:
        return DEFAULT_EVERY_S
    seconds = float(args[args.index("--retrain-every") + 1])
    return seconds if seconds > 0 else None


if __name__ == "__main__":
    sys.exit(main())
