"""What real-time features are worth, offline: the CTR protocol of end_to_end.py in-process.

benchmarks/end_to_end.py measures CTR with the feature job ON and OFF through the whole
local system (about 7 minutes). This script replays the same protocol without servers,
in seconds, so serving strategies can be compared and tuned: the same trained model
(from an end_to_end run folder, or trained here the way `recsys up` trains it), the same
synthetic world at the end of its period, the same visits (`World.plan`: who comes, what
they view, the click uniforms), and what the feature store would hold at each request:
the user's views sent up to then (a view is sent `--think-ms` before its recommendation)
and the items they clicked on earlier answers, newest first, all of them blocked as seen.
The real `Retriever` answers each request; clicks are drawn with the world's
ground-truth probability and the plan's uniforms, exactly as end_to_end.py draws them.

Arms (a `Retriever` each, same model):

- `off`: no store features (the tower sees the user id alone): end_to_end's OFF arm;
- `tower`: the store's recent items fed to the tower, no session stage (the handler
  before the session stage);
- `session`: the handler's default (`model_handlers.session_rerank`);

plus the **ceiling**: the ground truth's best 10 items for the user at that moment. Each
arm reports the expected CTR of its lists (mean probability of at least one click), the
realised CTR, the uplift over `off`, and the share of the gap from `off` to the ceiling it
closes. Never tune on the seeds end_to_end.py reports (1 and 2).

    .venv/bin/python benchmarks/realtime_offline.py --seeds 7,8,9
    .venv/bin/python benchmarks/realtime_offline.py --run-dir /tmp/e2e --session-weight 1.0
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from end_to_end import K, World, write_manifest

from model_handlers.online_features import NO_FEATURES, OnlineFeatures
from model_handlers.retriever import Retriever
from model_handlers.session_rerank import SESSION_OFF, SessionStage
from recsys_contracts.retrieval_request import RetrievalRequest

LAST_N = 50  # the store's recent-items list (examples/quickstart.yaml features.lastN)


@dataclass
class ArmResult:
    expected_ctr: float
    ctr: float
    clicks: int
    n: int


def model_directory(run_dir: Path | None, scratch: Path) -> tuple[Path, Path]:
    """(manifest, unpacked archive) of the model end_to_end.py serves: from the end_to_end
    run folder `run_dir` (its `run/` folder caches the model), trained there if missing."""
    from recsys_operator.local.desired_state import parse_system, read_manifest
    from recsys_operator.local.model_source import prepare_model
    from recsys_operator.local.run_folder import RunFolder

    work = run_dir or scratch
    work.mkdir(parents=True, exist_ok=True)
    manifest = work / "e2e.yaml"
    write_manifest(manifest)
    system = parse_system(read_manifest(manifest))
    prepared = prepare_model(RunFolder(work / "run"), system.spec.model, say=print)
    unpacked = scratch / "model"
    with zipfile.ZipFile(prepared.archive) as archive:
        archive.extractall(unpacked)
    return manifest, unpacked


def replay(
    world: World, retriever: Retriever | None, seed: int, visits: int, rate: float, think_s: float
) -> ArmResult:
    """One arm over the plan of `seed`; `retriever` None: the ceiling."""
    w = world.world
    plan = world.plan(visits, seed)
    sent_at = np.arange(visits) / rate
    recent: dict[int, list[str]] = {}  # user -> item ids, newest first
    seen: dict[int, set[str]] = {}
    clicks_due: list[tuple[float, int, str]] = []  # (time in the store, user, item)
    next_view, clicks = 0, 0
    expected = np.zeros(visits)

    def touch(user: int, item: str) -> None:
        recent.setdefault(user, []).insert(0, item)
        del recent[user][LAST_N:]
        seen.setdefault(user, set()).add(item)

    for i in range(visits):
        asked_at = sent_at[i] + think_s
        while next_view < visits and sent_at[next_view] <= asked_at:
            touch(int(plan.users[next_view]), w.item_ids[plan.viewed[next_view]])
            next_view += 1
        while clicks_due and clicks_due[0][0] <= asked_at:
            _, user, item = clicks_due.pop(0)
            touch(user, item)
        user = int(plan.users[i])
        if retriever is None:
            logits = w.click_logits(
                np.full(len(w.item_ids), user), np.arange(len(w.item_ids)), world.now_ms
            )
            items = [w.item_ids[n] for n in np.argsort(-logits)[:K]]
        else:
            features = (
                OnlineFeatures(
                    recent_item_ids=tuple(recent[user]), seen_item_ids=frozenset(seen[user])
                )
                if user in recent
                else NO_FEATURES
            )
            request = RetrievalRequest(
                user_id=w.user_ids[user], recent_item_ids=(), k=K, exclude_item_ids=()
            )
            items = retriever.recommend([request], [features]).recommendations[0].item_ids
        judged = world.judge(user, items, plan.click_uniforms[i])
        expected[i] = judged.p_any_click
        if judged.clicked is not None:
            clicks += 1
            clicks_due.append((asked_at + 0.05, user, items[judged.clicked]))
    return ArmResult(float(expected.mean()), clicks / visits, clicks, visits)


def replay_without_store(
    world: World, retriever: Retriever | None, seed: int, visits: int
) -> ArmResult:
    """The OFF arm: every request answered from the user id alone."""
    assert retriever is not None
    w = world.world
    plan = world.plan(visits, seed)
    expected, clicks = np.zeros(visits), 0
    for i in range(visits):
        user = int(plan.users[i])
        request = RetrievalRequest(
            user_id=w.user_ids[user], recent_item_ids=(), k=K, exclude_item_ids=()
        )
        items = retriever.recommend([request]).recommendations[0].item_ids
        judged = world.judge(user, items, plan.click_uniforms[i])
        expected[i] = judged.p_any_click
        clicks += judged.clicked is not None
    return ArmResult(float(expected.mean()), clicks / visits, clicks, visits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="7,8,9", help="plan seeds (never 1 or 2 for tuning)")
    parser.add_argument("--run-dir", type=Path, help="an end_to_end.py --run-dir folder")
    parser.add_argument("--ctr-rate", type=float, default=100.0)
    parser.add_argument("--ctr-seconds", type=float, default=45.0)
    parser.add_argument("--think-ms", type=float, default=1000.0)
    defaults = SessionStage()
    parser.add_argument("--session-weight", type=float, default=defaults.weight)
    parser.add_argument("--session-items", type=int, default=defaults.items)
    parser.add_argument("--session-decay", type=float, default=defaults.decay)
    parser.add_argument("--popularity-weight", type=float, default=defaults.popularity_weight)
    parser.add_argument("--candidates", type=int, default=defaults.candidates)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.monotonic()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")

    with tempfile.TemporaryDirectory(prefix="realtime-offline-") as scratch:
        manifest, unpacked = model_directory(args.run_dir, Path(scratch))
        world = World(manifest)
        stage = SessionStage(
            weight=args.session_weight,
            items=args.session_items,
            decay=args.session_decay,
            popularity_weight=args.popularity_weight,
            candidates=args.candidates,
        )
        tower_only = Retriever.load(unpacked, use_gpu=False, session=SESSION_OFF)
        arms: dict[str, Retriever | None] = {
            "off": tower_only,  # replayed without store features
            "tower": tower_only,
            "session": Retriever.load(unpacked, use_gpu=False, session=stage),
            "ceiling": None,
        }
        print(f"session stage: {stage}")
        visits = int(args.ctr_rate * args.ctr_seconds)
        for seed in (int(s) for s in args.seeds.split(",")):
            results = {}
            for name, retriever in arms.items():
                if name == "off":  # the store is empty: replay with no features at all
                    results[name] = replay_without_store(world, retriever, seed, visits)
                else:
                    results[name] = replay(
                        world, retriever, seed, visits, args.ctr_rate, args.think_ms / 1000
                    )
            report(seed, results)
    print(f"total {time.monotonic() - started:.0f}s, load average {os.getloadavg()[0]:.1f}")


def report(seed: int, results: dict[str, ArmResult]) -> None:
    off, ceiling = results["off"], results["ceiling"]
    print(f"seed {seed}: {off.n} visits")
    for name, r in results.items():
        uplift = r.expected_ctr / off.expected_ctr - 1
        gap = (r.expected_ctr - off.expected_ctr) / (ceiling.expected_ctr - off.expected_ctr)
        realised = r.ctr / off.ctr - 1 if off.ctr else math.nan
        print(
            f"  {name:>8}: expected CTR {100 * r.expected_ctr:6.2f}% ({100 * uplift:+6.1f}% vs "
            f"off, {100 * gap:5.1f}% of the gap to the ceiling) | realised {100 * r.ctr:6.2f}% "
            f"({100 * realised:+6.1f}%)"
        )


if __name__ == "__main__":
    main()
