"""What the local Prometheus scrapes: the gateway and the feature job (fixed for the
run), and the model servers, which come and go with rollouts, listed in a file
Prometheus re-reads (file_sd) so that it needs no restart."""

from __future__ import annotations

from collections.abc import Sequence

from recsys_operator.launchers.process import ManagedProcess
from recsys_operator.launchers.prometheus import prometheus_process
from recsys_operator.local.run_folder import RunFolder, write_json_atomic
from recsys_operator.local.traffic import ModelServers

SCRAPE_INTERVAL = "2s"


class ScrapeTargets:
    def __init__(self, folder: RunFolder) -> None:
        self.folder = folder
        self.model_servers_file = folder.root / "prometheus" / "model-servers.json"

    def write_model_servers(self, servers: ModelServers) -> None:
        self.model_servers_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.model_servers_file, [{"targets": servers.metrics_targets()}])

    def prometheus(self, fixed_targets: Sequence[str]) -> ManagedProcess:
        """A Prometheus scraping `fixed_targets` (host:port) and the model servers' file."""
        return prometheus_process(
            self.folder.root,
            fixed_targets,
            scrape_interval=SCRAPE_INTERVAL,
            targets_file=self.model_servers_file,
        )
