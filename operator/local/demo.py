"""`recsys demo`: the continuous-learning loop on one machine in a few minutes.

1. Version 1 is a stale model: trained on the first `STALE_FRACTION` of the synthetic
   world's period. The run folder's event log holds those same events (written in the
   sink's layout, ending a minute ago): what the log held when version 1 was built.
2. Simulated users arrive where version 1's data ends, and their interests drift on to
   the end of the period over `DRIFT_S` seconds: version 1's CTR falls.
3. The supervisor retrains every `RETRAIN_EVERY` from the event log (spec.training in
   examples/demo.yaml, autoRollout on). Early runs find too few interactions (the
   users' new events have not piled up yet) and are gated out with their numbers; a
   later one, trained on the logged events, beats version 1 on the newest held-out
   slice, is published, canaried and promoted by the rollout's analysis: CTR recovers.
4. Everything stops; `<run folder>/demo/` holds summary.md (every run's verdict and
   the rollout), timeline.csv (per-second figures) and demo.png (CTR per version, with
   the training runs and their verdicts marked).
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recsys_operator.local.run_folder import RunFolder

STALE_FRACTION = 0.3
"""Version 1 learned from this share of the synthetic period; users start here."""
DRIFT_S = 120.0
"""Seconds over which the users' interests move from there to the period's end."""
RETRAIN_EVERY = "60s"
RECOVERY_S = 45.0
"""How long users stay after the candidate's rollout ends, to show the CTR it brings."""
LOOP_TIMEOUT_S = 720.0
MIN_PLOTTED_SAMPLES = 20

MARK_REASONS = {
    "TrainingStarted": "training",
    "TrainingGatedOut": "gated out",
    "TrainingPassed": "passed",
    "TrainingFailed": "failed",
}


def recsys(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recsys_operator.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Director(threading.Thread):
    """Follows the loop in state.json while the users and the dashboard run; marks each
    training run, verdict and rollout decision; sets `stop` once the candidate's rollout
    ended and the users have seen its effect (or the loop took too long)."""

    def __init__(self, folder: RunFolder, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.folder, self.stop = folder, stop
        self.marks: list[tuple[float, str]] = []  # (unix time, label) for the plot
        self.outcome: dict[str, Any] | None = None
        self.error: str | None = None
        self._seen: set[tuple[str, str]] = set()

    def run(self) -> None:
        try:
            deadline = time.monotonic() + LOOP_TIMEOUT_S
            while self.outcome is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no candidate rolled out within {LOOP_TIMEOUT_S:.0f}s")
                self._follow(self.folder.read_state() or {})
                self._wait(1.0)
            self._wait(RECOVERY_S)
        except Exception as exc:  # reported in the summary; the demo still stops cleanly
            self.error = str(exc)
        finally:
            self.stop.set()

    def _wait(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise RuntimeError("stopped by the user")

    def _follow(self, state: dict[str, Any]) -> None:
        for event in state.get("events") or []:
            key = (event["time"], event["reason"])
            label = MARK_REASONS.get(event["reason"])
            if label is None or key in self._seen:
                continue
            self._seen.add(key)
            at = datetime.fromisoformat(event["time"]).timestamp()
            self.marks.append((at, label))
        candidate = (((state.get("training") or {}).get("status")) or {}).get("result")
        last = (state.get("rollout") or {}).get("lastRollout") or {}
        if candidate == "Passed" and last.get("version") not in (None, "1"):
            self.outcome = last
            self.marks.append((time.time(), f"v{last['version']} {last.get('outcome')}"))


def run_demo(manifest: Path, *, rate: float, dashboard: bool) -> int:
    from recsys_operator.local.desired_state import load_system_manifest, parse_system
    from recsys_operator.local.model_source import prepare_model
    from recsys_operator.local.simulation import Drift, run_simulation

    folder = RunFolder.for_system("default.demo")
    out = folder.root / "demo"
    model = parse_system(load_system_manifest([manifest])).spec.model
    print(f"== preparing {folder.root}: a stale version 1 and the event log it learned from")
    fresh_start(folder)
    stale = prepare_model(folder, model, history_fraction=STALE_FRACTION, say=print)
    logged = backfill_event_log(folder, model, STALE_FRACTION)
    print(f"   {stale.origin}; {logged} events of that period in {folder.event_log}")
    print(f"== starting the demo system from {manifest} (retraining every {RETRAIN_EVERY})")
    up = subprocess.run(
        [
            sys.executable, "-m", "recsys_operator.cli", "up", "-f", str(manifest),
            "--run-dir", str(folder.root), "--archive", str(stale.archive),
            "--retrain-every", RETRAIN_EVERY,
        ],
        timeout=900,
    )  # fmt: skip
    if up.returncode != 0:
        return up.returncode
    out.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    director = Director(folder, stop)
    started = time.time()
    print(
        f"== simulated users at {rate:.0f} req/s, their interests drifting for {DRIFT_S:.0f}s; "
        "the system retrains from what they do"
    )
    try:
        director.start()
        summary = run_simulation(
            folder,
            rate=rate,
            duration=0,
            stop=stop,
            dashboard=dashboard,
            record=out / "timeline.csv",
            drift=Drift(start_fraction=STALE_FRACTION, seconds=DRIFT_S),
        )
    except KeyboardInterrupt:
        stop.set()
        summary = "interrupted"
    finally:
        stop.set()
        director.join(timeout=RECOVERY_S + 30)
        final_state = folder.read_state() or {}
        print("== stopping the demo system")
        subprocess.run(
            [sys.executable, "-m", "recsys_operator.cli", "down", "--run-dir", str(folder.root)],
            timeout=180,
        )
    verdicts = read_verdicts(folder, model.name)
    text = write_summary(out, director, verdicts, summary, final_state, started)
    plot = plot_timeline(out / "timeline.csv", out / "demo.png", director.marks, started)
    print(text)
    print(
        f"\nsummary: {out / 'summary.md'}\nplot:    {plot or 'not drawn (pip install matplotlib)'}"
    )
    gated_out = any(v.get("result") == "GatedOut" for v in verdicts)
    promoted = (director.outcome or {}).get("outcome") == "Promoted"
    return 0 if gated_out and promoted else 1


def fresh_start(folder: RunFolder) -> None:
    """Nothing of an earlier demo: its logged events, candidates and verdicts."""
    from recsys_contracts.training_report import TRAINING_REPORTS_FOLDER

    shutil.rmtree(folder.event_log, ignore_errors=True)
    shutil.rmtree(folder.model_store / TRAINING_REPORTS_FOLDER, ignore_errors=True)
    for archive in folder.model_store.glob("*.mar"):
        archive.unlink()
    for latest in folder.model_store.glob("*.training.json"):
        latest.unlink()
    shutil.rmtree(folder.root / "demo", ignore_errors=True)


def backfill_event_log(folder: RunFolder, model: Any, history_fraction: float) -> int:
    """Write the synthetic world's events before the cut into the run folder's event log,
    in the sink's layout (`recsys_contracts.event_log_layout`), moved in time so that the
    last of them happened a minute ago. Returns the number of events."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from model_handlers.synthetic import SyntheticWorld
    from recsys_contracts import event_log_layout as layout
    from recsys_operator.local.model_source import history_cut_ms, synthetic_world_config

    log = SyntheticWorld(synthetic_world_config(model)).interactions()
    log = log.select(log.timestamp_ms < history_cut_ms(model, history_fraction))
    shift = int(time.time() * 1000) - 60_000 - int(log.timestamp_ms.max())
    ts = (log.timestamp_ms + shift).astype(np.int64)
    n = len(log)
    table = pa.table(
        {
            "event_id": [f"history-{r}" for r in range(n)],
            "user_id": [log.user_ids[u] for u in log.user.tolist()],
            "item_id": [log.item_ids[i] for i in log.item.tolist()],
            "type": ["view"] * n,
            "ts": pa.array(ts, pa.int64()),
            "dwell_ms": pa.array(log.dwell_ms.astype(np.int64), pa.int64()),
            "request_id": pa.array([None] * n, pa.string()),
            "model_version": pa.array([None] * n, pa.string()),
        },
        schema=layout.schema(layout.INTERACTIONS_TABLE),
    )
    partitions = np.array(["/".join(layout.partition_of(int(t))) for t in ts])
    for partition in np.unique(partitions):
        date, hour = partition.split("/")
        target = folder.event_log / layout.partition_dir(layout.INTERACTIONS_TABLE, date, hour)
        target.mkdir(parents=True, exist_ok=True)
        rows = table.filter(pa.array(partitions == partition))
        pq.write_table(rows, target / f"{layout.BATCH_PREFIX}history{layout.PARQUET_SUFFIX}")
    return n


def read_verdicts(folder: RunFolder, model_name: str) -> list[dict[str, Any]]:
    """Every run's verdict (the model store keeps them all), oldest first."""
    from recsys_contracts.training_report import TRAINING_REPORTS_FOLDER

    verdicts = []
    for path in (folder.model_store / TRAINING_REPORTS_FOLDER).glob(f"{model_name}-*.json"):
        try:
            verdicts.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(verdicts, key=lambda v: v.get("finishedAt", ""))


def ctr_by_version(timeline: Path, since_s: float = 0.0) -> dict[str, tuple[int, float]]:
    """version -> (responses, CTR) over the timeline's 10 s windows after `since_s`."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    try:
        with open(timeline) as f:
            for row in csv.DictReader(f):
                if float(row["t"]) < since_s or row["ctr"] == "nan":
                    continue
                n = int(row["n"])
                totals[row["version"]][0] += n
                totals[row["version"]][1] += n * float(row["ctr"])
    except OSError:
        return {}
    return {v: (int(n), c / n) for v, (n, c) in totals.items() if n}


def write_summary(
    out: Path,
    director: Director,
    verdicts: list[dict[str, Any]],
    simulation: str,
    state: dict[str, Any],
    started: float,
) -> str:
    lines = [
        f"# recsys demo: continuous learning, {datetime.fromtimestamp(started, UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Duration {time.time() - started:.0f} s; stable at the end: version "
        f"{(state.get('rollout') or {}).get('stableVersion')}.",
        "",
        "## Training runs (from the event log)",
        "",
        "| finished | candidate | interactions | result | candidate | stable | change | reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        candidate, stable = v.get("candidate") or {}, v.get("stable") or {}
        change = v.get("relativeImprovement")
        lines.append(
            f"| {v.get('finishedAt', '')[11:19]} | {v.get('candidateVersion')} | "
            f"{v.get('interactions')} | {v.get('result')} | {_num(candidate.get('value'), 4)} | "
            f"{_num(stable.get('value'), 4)} | {'-' if change is None else f'{change:+.1%}'} | "
            f"{v.get('reason')} |"
        )
    outcome = director.outcome
    if outcome:
        analysis = outcome.get("lastAnalysis") or {}
        lines += [
            "",
            "## The candidate's rollout",
            "",
            f"Version {outcome.get('version')}: {outcome.get('outcome')} ({outcome.get('reason')}); "
            f"last analysis: canary CTR {_pct(analysis.get('canaryCtr'))} vs stable "
            f"{_pct(analysis.get('stableCtr'))}.",
        ]
    if director.error:
        lines += ["", f"The demo did not finish: {director.error}"]
    lines += ["", "```", simulation, "```"]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def plot_timeline(
    timeline: Path, png: Path, marks: list[tuple[float, str]], started: float
) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with open(timeline) as f:
        for row in csv.DictReader(f):
            if int(row["n"]) < MIN_PLOTTED_SAMPLES:
                continue  # a CTR of 1 click in 2 responses is noise, not a trend
            s = series[row["version"]]
            if s["t"] and float(row["t"]) - s["t"][-1] > 2:
                for key in ("t", "p99", "ctr"):  # a gap: do not draw a line across it
                    s[key].append(float("nan"))
            s["t"].append(float(row["t"]))
            s["p99"].append(float(row["p99_ms"]))
            s["ctr"].append(100 * float(row["ctr"]))
    figure, (ctr, latency) = plt.subplots(
        2, 1, figsize=(11, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]}
    )
    for version, s in sorted(series.items()):
        label = "version 1 (stale)" if version == "1" else f"version {version} (retrained)"
        ctr.plot(s["t"], s["ctr"], label=label)
        latency.plot(s["t"], s["p99"], label=label)
    colours = {"training": "grey", "gated out": "tab:red", "passed": "tab:green"}
    # The timeline's clock starts with the simulation, a moment after `started`.
    for at, label in marks:
        colour = colours.get(label, "tab:blue")
        for axis in (ctr, latency):
            axis.axvline(at - started, color=colour, linestyle=":", linewidth=1)
        height = 0.02 if label == "training" else 0.3  # a verdict and the next start coincide
        ctr.annotate(
            label, (at - started, height), xycoords=("data", "axes fraction"),
            rotation=90, fontsize=7, va="bottom", color=colour,
        )  # fmt: skip
    ctr.set_ylabel("CTR (%, 10 s window)")
    latency.set_ylabel("p99 latency (ms)")
    latency.set_xlabel("seconds")
    ctr.legend(loc="upper right")
    ctr.set_title(
        "Drift lowers the stale model's CTR; a retrain from the logged events passes the "
        "gate and its canary is promoted"
    )
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)
    return png
