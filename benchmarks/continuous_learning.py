"""Value of retraining: CTR of drifting users under the stale model, then after one
automatic retrain, end to end through the gate and the canary.

The local system runs examples/demo.yaml as `recsys demo` sets it up: version 1 is a
two-tower model trained on the first 30% of the synthetic world's period, and the event
log holds the events it learned from. Simulated users come with their interests as
they are at the end of the period (drifted since), at `--rate` visits per second:

1. **Stale**: every answer is version 1's; their views and clicks are logged. Measured
   over the `--measure` seconds before a run passes (the feature job has had minutes
   of these users' events by then, as it has for the retrained arm).
2. The supervisor retrains every `--retrain-every` from the event log (spec.training,
   autoRollout). The benchmark waits until a run passes the gate, its canary is
   analysed on these users' CTR, and promoted (or rolled back: then it reports that).
3. **Retrained**: `--measure` seconds of the same users' visits answered by the
   promoted candidate.

CTR is clicks per answer as the users saw it; the 95% interval of the relative change
is the delta method on the log of the ratio of two proportions (the arms are separate
visits of the same users). Also printed: each run's verdict and the canary's analysis.

`python benchmarks/continuous_learning.py [--rate 30] [--measure 90] [--seed 1]`
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ctr_ratio import relative_ctr_change

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "examples" / "demo.yaml"


def ctr(samples: list[Any]) -> tuple[int, int]:
    ok = [s for s in samples if s.ok]
    return len(ok), sum(s.clicked for s in ok)


def wait_for(folder: Any, check: Any, timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = folder.read_state() or {}
        found = check(state)
        if found:
            return found if isinstance(found, dict) else state
        time.sleep(1.0)
    raise SystemExit(f"{what} not reached within {timeout:.0f}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=30.0, help="visits per second")
    parser.add_argument("--measure", type=float, default=90.0, help="seconds of the retrained arm")
    parser.add_argument("--retrain-every", default="60s")
    parser.add_argument("--timeout", type=float, default=900.0, help="for the loop to finish")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--run-dir", type=Path, default=ROOT / ".runs" / "bench.continuous")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: parse, prepare and stop (no figures)"
    )
    args = parser.parse_args()

    from recsys_operator.local.demo import (
        STALE_FRACTION,
        backfill_event_log,
        fresh_start,
        read_verdicts,
    )
    from recsys_operator.local.desired_state import parse_system, read_manifest
    from recsys_operator.local.model_source import prepare_model
    from recsys_operator.local.run_folder import RunFolder
    from recsys_operator.local.simulation import SimulatedUsers

    folder = RunFolder(args.run_dir)
    model = parse_system(read_manifest(MANIFEST)).spec.model
    fresh_start(folder)
    stale = prepare_model(folder, model, history_fraction=STALE_FRACTION, say=print)
    logged = backfill_event_log(folder, model, STALE_FRACTION)
    print(f"version 1: {stale.origin}; {logged} events of that period in the log")
    if args.quick:
        return 0
    up = subprocess.run(
        [
            sys.executable, "-m", "recsys_operator.cli", "up", "-f", str(MANIFEST),
            "--run-dir", str(folder.root), "--archive", str(stale.archive),
            "--retrain-every", args.retrain_every,
        ],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if up.returncode != 0:
        print(up.stdout + up.stderr)
        return 1
    stop = threading.Event()
    try:
        gateway = (folder.read_state() or {})["urls"]["gateway"]
        users = SimulatedUsers(folder, gateway, args.rate, args.seed)
        runner = threading.Thread(target=users.run, args=(0, stop), daemon=True)
        started = time.monotonic()
        runner.start()

        def passed(state: dict[str, Any]) -> dict[str, Any] | None:
            status = ((state.get("training") or {}).get("status")) or {}
            return status if status.get("result") == "Passed" else None

        candidate = wait_for(folder, passed, args.timeout, "a passing training run")
        version = candidate["candidateVersion"]
        passed_at = time.monotonic()

        def decided(state: dict[str, Any]) -> dict[str, Any] | None:
            last = (state.get("rollout") or {}).get("lastRollout") or {}
            return last if last.get("version") == version else None

        rollout = wait_for(folder, decided, args.timeout, f"a decision on {version}")
        decided_at = time.monotonic()
        time.sleep(args.measure)
        ended = time.monotonic()
    finally:
        stop.set()
        subprocess.run(
            [sys.executable, "-m", "recsys_operator.cli", "down", "--run-dir", str(folder.root)],
            capture_output=True, timeout=180,
        )  # fmt: skip

    with users.stats.lock:
        samples = list(users.stats.samples)
    # The stale arm: version 1's answers in the last `measure` seconds before a run
    # passed; the retrained arm: the candidate's for as long once its rollout was decided.
    stale_arm = ctr(
        [s for s in samples if s.version == "1" and passed_at - args.measure <= s.at < passed_at]
    )
    new_arm = ctr([s for s in samples if s.version == version and decided_at <= s.at < ended])
    print("\ntraining runs:")
    for v in read_verdicts(folder, model.name):
        print(f"  {v.get('candidateVersion')}: {v.get('result')}, {v.get('interactions')} "
              f"interactions; {v.get('reason')}")  # fmt: skip
    analysis = rollout.get("lastAnalysis") or {}
    print(
        f"rollout of {version}: {rollout.get('outcome')} ({rollout.get('reason')}); canary CTR "
        f"{analysis.get('canaryCtr')} vs stable {analysis.get('stableCtr')}"
    )
    print(
        f"loop: passing verdict {passed_at - started:.0f}s after the users came, rollout "
        f"decided {decided_at - passed_at:.0f}s later"
    )
    if rollout.get("outcome") != "Promoted" or not new_arm[0]:
        print("the candidate was not promoted: no retrained arm to measure")
        return 1
    change, low, high = relative_ctr_change(stale_arm[1], stale_arm[0], new_arm[1], new_arm[0])
    print(f"\nCTR of the drifting users ({args.rate:.0f} visits/s, seed {args.seed}):")
    print(
        f"  stale version 1       {stale_arm[1] / stale_arm[0]:.2%} ({stale_arm[1]}/{stale_arm[0]})"
    )
    print(f"  retrained {version:<11} {new_arm[1] / new_arm[0]:.2%} ({new_arm[1]}/{new_arm[0]})")
    print(f"  change {change:+.1%} (95% CI {low:+.1%} to {high:+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
