"""`recsys demo`: the whole story on one machine in a few minutes.

Starts the demo system (examples/demo.yaml), sends simulated users at it with the
live dashboard, rolls out a good version 2 (promoted) and then a broken version 3
(random item vectors: rolled back on click-through rate), stops everything, and
leaves a summary, the per-second timeline and a plot of latency and CTR per model
version in `<run folder>/demo/`.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recsys_operator.local.run_folder import RunFolder

BASELINE_S = 20.0
MIN_PLOTTED_SAMPLES = 20
DECISION_TIMEOUT_S = 300.0


def recsys(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recsys_operator.cli", *args],
        capture_output=True,
        text=True,
        timeout=DECISION_TIMEOUT_S,
    )


class Director(threading.Thread):
    """Runs the demo's rollouts while the users and the dashboard run; sets `stop` at the end."""

    def __init__(self, folder: RunFolder, stop: threading.Event, archives: dict[str, Path]) -> None:
        super().__init__(daemon=True)
        self.folder, self.stop, self.archives = folder, stop, archives
        self.outcomes: list[dict[str, Any]] = []
        self.marks: list[tuple[float, str]] = []  # (unix time, label) for the plot
        self.error: str | None = None

    def run(self) -> None:
        try:
            self._wait(BASELINE_S)
            self._roll_out("2")
            self._wait(10)
            self._roll_out("3")
            self._wait(10)
        except Exception as exc:  # reported in the summary; the demo still stops cleanly
            self.error = str(exc)
        finally:
            self.stop.set()

    def _wait(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise RuntimeError("stopped by the user")

    def _roll_out(self, version: str) -> None:
        result = recsys(
            "rollout", "start", "--version", version,
            "--archive", str(self.archives[version]), "--run-dir", str(self.folder.root),
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"rollout start --version {version} failed: {result.stderr.strip()}")
        self.marks.append((time.time(), f"v{version} canary"))
        deadline = time.monotonic() + DECISION_TIMEOUT_S
        while time.monotonic() < deadline:
            state = self.folder.read_state() or {}
            last = (state.get("rollout") or {}).get("lastRollout") or {}
            if last.get("version") == version:
                self.outcomes.append(last)
                self.marks.append((time.time(), f"v{version} {last.get('outcome')}"))
                return
            self._wait(1.0)
        raise RuntimeError(f"no decision on version {version} within {DECISION_TIMEOUT_S:.0f}s")


def run_demo(manifest: Path, *, rate: float, dashboard: bool) -> int:
    from recsys_operator.local.simulation import run_simulation

    folder = RunFolder.for_system("default.demo")
    out = folder.root / "demo"
    print(f"== starting the demo system from {manifest} (trains version 1 on synthetic data)")
    up = subprocess.run(
        [
            sys.executable,
            "-m",
            "recsys_operator.cli",
            "up",
            "-f",
            str(manifest),
            "--run-dir",
            str(folder.root),
        ],
        timeout=900,
    )
    if up.returncode != 0:
        return up.returncode
    out.mkdir(parents=True, exist_ok=True)
    archives = prepare_candidates(folder, out)
    stop = threading.Event()
    director = Director(folder, stop, archives)
    started = time.time()
    print(f"== simulated users at {rate:.0f} req/s; rolling out version 2, then a broken version 3")
    try:
        director.start()
        summary = run_simulation(
            folder,
            rate=rate,
            duration=0,
            stop=stop,
            dashboard=dashboard,
            record=out / "timeline.csv",
        )
    except KeyboardInterrupt:
        stop.set()
        summary = "interrupted"
    finally:
        stop.set()
        director.join(timeout=DECISION_TIMEOUT_S)
        final_state = folder.read_state() or {}
        print("== stopping the demo system")
        subprocess.run(
            [sys.executable, "-m", "recsys_operator.cli", "down", "--run-dir", str(folder.root)],
            timeout=180,
        )
    text = write_summary(out, director, summary, final_state, started)
    plot = plot_timeline(out / "timeline.csv", out / "demo.png", director.marks, started)
    print(text)
    print(
        f"\nsummary: {out / 'summary.md'}\nplot:    {plot or 'not drawn (pip install matplotlib)'}"
    )
    promoted = any(
        o.get("version") == "2" and o.get("outcome") == "Promoted" for o in director.outcomes
    )
    rolled_back = any(
        o.get("version") == "3" and o.get("outcome") == "RolledBack" for o in director.outcomes
    )
    return 0 if promoted and rolled_back else 1


def prepare_candidates(folder: RunFolder, out: Path) -> dict[str, Path]:
    """Train version 2 and break version 3 before the users arrive: training competes
    with serving for the CPU, and the demo is about the rollout, not the trainer."""
    import shutil

    from recsys_operator.local.desired_state import parse_system, read_manifest
    from recsys_operator.local.model_source import prepare_model

    model = parse_system(read_manifest(folder.manifest)).spec.model
    candidates = out / "candidates"
    candidates.mkdir(exist_ok=True)
    archives = {}
    for version, broken in (("2", False), ("3", True)):
        print(f"== preparing version {version}" + (" (random item vectors)" if broken else ""))
        candidate = model.model_copy(update={"version": version, "archive_uri": None})
        folder.archive(model.name, version).unlink(missing_ok=True)  # never an earlier run's
        prepared = prepare_model(folder, candidate, random_embeddings=broken, say=print)
        archives[version] = candidates / prepared.archive.name
        shutil.copyfile(prepared.archive, archives[version])
    return archives


def write_summary(
    out: Path, director: Director, simulation: str, state: dict[str, Any], started: float
) -> str:
    lines = [
        f"# recsys demo, {datetime.fromtimestamp(started, UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Duration {time.time() - started:.0f} s; stable at the end: version "
        f"{(state.get('rollout') or {}).get('stableVersion')}.",
        "",
        "| version | outcome | reason | stable CTR | canary CTR | p-value | canary p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for outcome in director.outcomes:
        analysis = outcome.get("lastAnalysis") or {}
        lines.append(
            f"| {outcome.get('version')} | {outcome.get('outcome')} | {outcome.get('reason')} | "
            f"{_pct(analysis.get('stableCtr'))} | {_pct(analysis.get('canaryCtr'))} | "
            f"{_num(analysis.get('pValue'), 4)} | {_num(analysis.get('canaryP99Ms'), 1)} |"
        )
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
    figure, (latency, ctr) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for version, s in sorted(series.items()):
        latency.plot(s["t"], s["p99"], label=f"version {version}")
        ctr.plot(s["t"], s["ctr"], label=f"version {version}")
    # The timeline's clock starts with the simulation, a moment after `started`.
    for at, label in marks:
        for axis in (latency, ctr):
            axis.axvline(at - started, color="grey", linestyle=":", linewidth=1)
        ctr.annotate(label, (at - started, 0), rotation=90, fontsize=7, va="bottom")
    latency.set_ylabel("p99 latency (ms, 10 s window)")
    ctr.set_ylabel("CTR (%, 10 s window)")
    ctr.set_xlabel("seconds")
    latency.legend(loc="upper left")
    latency.set_title("Per model version, as the simulated users saw it")
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)
    return png
