"""Offline retrieval quality of the project's models against classical peers, in one run.

Protocol (`model_handlers.evaluation`): each user's last 20% of interactions is test;
every test user with training history counts; their train items are never recommended;
NDCG@10, Recall@10 (hits / min(10, |test|)), MRR@10, coverage@10. Models are trained on
the train part only; the project's models choose their settings on a holdout of it.

Peers: popularity, item-kNN (cosine, 100 neighbours), implicit ALS (`implicit`, best of
three settings *on test*, which flatters it), EASE λ=200 (numpy). Ours: `ease` (the
default: recency-weighted EASE, λ and recency chosen on the validation holdout) and
`two_tower`. Mean ± standard deviation over seeds (seeds change ALS, the two-tower and,
for subsampled data, the subsample). Also the archive index's recall@10 against exact
search on >= 1,000 queries (HNSW, default parameters).

Datasets: the synthetic world (unless --no-synthetic), a MovieLens file (--movielens),
and derived subsamples of it that probe generality (--subsamples):
- `sparse`: 40% of each user's interactions, at random (fewer per user);
- `5x-items`: every item split into 5 look-alikes, each interaction going to one at
  random (a catalogue five times larger and sparser);
- `bursty`: each user keeps only their most active 7-day window (activity bunched in time);
- `5x-items+bursty`: both.

    python benchmarks/quality.py --movielens ../shared/data/movielens-100k/u.data --seeds 5
    python benchmarks/quality.py --quick          # < 60 s smoke run on a small synthetic world
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from model_handlers.baselines import (
    AlsBaseline,
    EaseBaseline,
    ItemKnnBaseline,
    PopularityBaseline,
)
from model_handlers.evaluation import Scorer, evaluate, evaluation_set, per_user_split
from model_handlers.interactions import Interactions
from model_handlers.item_index import build_index, measure_recall
from model_handlers.synthetic import SyntheticConfig, SyntheticWorld
from model_handlers.training import TrainingConfig, train_model
from recsys_operator.api.recommender_system import IndexSpec

METRICS = ("ndcg@10", "recall@10", "mrr@10", "coverage@10")
ALS_SETTINGS = ((64, 0.05, 10), (128, 0.1, 20), (32, 0.01, 5))
SUBSAMPLES = ("sparse", "5x-items", "bursty", "5x-items+bursty")
DAY_MS = 86_400_000


# --- derived datasets ---------------------------------------------------------------


def _rebuild(
    log: Interactions, rows: np.ndarray, items: np.ndarray, item_ids: list[str]
) -> Interactions:
    return Interactions(
        user_ids=log.user_ids,
        item_ids=item_ids,
        item_category=np.zeros(len(item_ids), dtype=np.int32),
        category_names=log.category_names[:1],
        user=log.user[rows],
        item=items.astype(np.int32),
        timestamp_ms=log.timestamp_ms[rows],
        session=log.session[rows],
        dwell_ms=log.dwell_ms[rows],
    )


def subsample(log: Interactions, kind: str, seed: int) -> Interactions:
    rng = np.random.default_rng(1000 + seed)
    rows = np.arange(len(log))
    if "sparse" in kind:
        rows = rows[rng.random(len(rows)) < 0.4]
    if "bursty" in kind:
        keep = np.zeros(len(log), dtype=bool)
        order = np.lexsort((log.timestamp_ms, log.user))
        users = log.user[order]
        bounds = np.searchsorted(users, np.arange(log.num_users + 1))
        for u in range(log.num_users):
            r = order[bounds[u] : bounds[u + 1]]
            if len(r) == 0:
                continue
            ts = log.timestamp_ms[r]
            # The 7-day window with the most interactions, starting at one of them.
            ends = np.searchsorted(ts, ts + 7 * DAY_MS, side="left")
            start = int(np.argmax(ends - np.arange(len(ts))))
            keep[r[start : ends[start]]] = True
        rows = rows[keep[rows]]
    items = log.item[rows].astype(np.int64)
    item_ids = log.item_ids
    if "5x-items" in kind:
        items = items * 5 + rng.integers(0, 5, len(items))
        item_ids = [f"{i}~{c}" for i in log.item_ids for c in range(5)]
    out = _rebuild(log, rows, items, item_ids)
    # Drop items nobody touched so the catalogue is what the data holds.
    used = np.unique(out.item)
    remap = np.full(len(item_ids), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return _rebuild(log, rows, remap[out.item], [item_ids[i] for i in used]).sorted_by_time()


# --- one run ------------------------------------------------------------------------


def _timed(make: Callable[[], Scorer]) -> tuple[Scorer, float]:
    started = time.monotonic()
    scorer = make()
    return scorer, time.monotonic() - started


def run(
    log: Interactions, seed: int, *, two_tower: bool, quick: bool, index_recall: bool
) -> dict[str, Any]:
    train, test = per_user_split(log)
    eval_set = evaluation_set(train, test)
    results: dict[str, Any] = {"users": len(eval_set), "items": log.num_items, "seconds": {}}

    def score(name: str, make: Callable[[], Scorer]) -> None:
        scorer, seconds = _timed(make)
        results[name] = evaluate(scorer, eval_set, cutoffs=(10,))
        results["seconds"][name] = round(seconds, 1)

    score("popularity", lambda: PopularityBaseline(train))
    score("item_knn", lambda: ItemKnnBaseline(train))
    als = []
    for factors, reg, iterations in ALS_SETTINGS[:1] if quick else ALS_SETTINGS:
        scorer, seconds = _timed(
            lambda f=factors, r=reg, i=iterations: AlsBaseline(
                train, factors=f, regularization=r, iterations=i, seed=seed
            )
        )
        als.append((evaluate(scorer, eval_set, cutoffs=(10,)), seconds))
    results["als"], seconds = max(als, key=lambda a: a[0]["ndcg@10"])
    results["seconds"]["als"] = round(seconds, 1)
    if log.num_items <= 20_000:
        score("ease_l200", lambda: EaseBaseline(train, l2=200.0))

    config = TrainingConfig(seed=seed, threads=None)
    if quick:
        config = replace(
            config,
            ease=replace(config.ease, l2_grid=(200.0, 800.0), half_life_grid=(5.0, float("inf"))),
        )
    started = time.monotonic()
    trained = train_model(train, config)
    results["ease"] = evaluate(trained.scorer(), eval_set, cutoffs=(10,))
    results["seconds"]["ease"] = round(time.monotonic() - started, 1)
    results["ease_selected"] = trained.metrics["training"]["selected"]
    results["ease_validation_users"] = trained.metrics["protocol"]["users_evaluated"]
    if index_recall:
        results["index_recall@10"] = _index_recall(trained.item_embeddings, trained.query_sample)
    if two_tower:
        started = time.monotonic()
        tt_config = replace(config, model="two_tower")
        if quick:
            tt_config = replace(
                tt_config, max_epochs=1, min_epochs=1, refit=False, dim=16, hidden=32
            )
        tt = train_model(train, tt_config)
        results["two_tower"] = evaluate(tt.scorer(), eval_set, cutoffs=(10,))
        results["seconds"]["two_tower"] = round(time.monotonic() - started, 1)
        results["two_tower_best_epoch"] = tt.metrics["training"]["best_epoch"]
    return results


def _index_recall(embeddings: np.ndarray, queries: np.ndarray) -> dict[str, float]:
    from model_handlers.item_index import ItemIndex

    spec = IndexSpec(type="HNSW")
    index = ItemIndex(build_index(embeddings, spec), spec)
    n = min(len(queries), 2000)
    return {
        "recall": round(measure_recall(index, embeddings, queries[:n], k=10), 4),
        "queries": n,
    }


# --- report -------------------------------------------------------------------------

MODEL_ORDER = ("popularity", "item_knn", "als", "ease_l200", "two_tower", "ease")


def table(title: str, runs: list[dict[str, Any]]) -> str:
    models = [m for m in MODEL_ORDER if m in runs[0]]
    lines = [
        f"### {title}",
        "",
        "| model | " + " | ".join(METRICS) + " | seconds |",
        "|---" * (len(METRICS) + 2) + "|",
    ]
    for model in models:
        cells = []
        for metric in METRICS:
            values = np.array([r[model][metric] for r in runs])
            spread = f" ± {values.std(ddof=1):.4f}" if len(values) > 1 else ""
            cells.append(f"{values.mean():.4f}{spread}")
        seconds = np.mean([r["seconds"][model] for r in runs])
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {seconds:.1f} |")
    mean = {m: np.mean([r[m]["ndcg@10"] for r in runs]) for m in models}
    ratios = ", ".join(
        f"ease/{peer} {mean['ease'] / mean[peer]:.2f}"
        for peer in ("als", "ease_l200", "item_knn", "popularity")
        if peer in mean and mean[peer] > 0
    )
    lines += [
        "",
        f"{len(runs)} seed(s); users evaluated {sorted({r['users'] for r in runs})}; "
        f"items {sorted({r['items'] for r in runs})}; NDCG@10 ratios of means: {ratios}",
        f"ease selected (on validation): {[r['ease_selected'] for r in runs][:3]}; "
        f"validation users {sorted({r['ease_validation_users'] for r in runs})}",
    ]
    recalls = [r["index_recall@10"] for r in runs if "index_recall@10" in r]
    if recalls:
        lines.append(f"HNSW index recall@10 vs exact (first seed): {recalls}")
    if "two_tower_best_epoch" in runs[0]:
        lines.append(f"two_tower best epochs: {[r['two_tower_best_epoch'] for r in runs]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5, help="seeds to average (at least 1)")
    parser.add_argument("--movielens", type=Path, default=None, help="a MovieLens ratings file")
    parser.add_argument("--min-rating", type=float, default=0.0)
    parser.add_argument("--no-synthetic", action="store_true", help="skip the synthetic world")
    parser.add_argument("--subsamples", action="store_true", help="also the derived datasets")
    parser.add_argument(
        "--subsample-seeds",
        type=int,
        default=None,
        help="seeds for the subsamples (default --seeds)",
    )
    parser.add_argument(
        "--only-subsamples", nargs="*", default=None, choices=SUBSAMPLES, help="which subsamples"
    )
    parser.add_argument("--no-two-tower", action="store_true", help="skip the two-tower model")
    parser.add_argument("--quick", action="store_true", help="small world, one seed, < 60 s")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.no_synthetic and args.movielens is None:
        parser.error("--no-synthetic needs --movielens")

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
    seeds = 1 if args.quick else args.seeds
    datasets: list[tuple[str, Callable[[int], Interactions], bool]] = []
    """(title, seed -> log, whether it is a derived subsample)"""
    if not args.no_synthetic:
        world = (
            SyntheticConfig(users=300, items=500, seed=0) if args.quick else SyntheticConfig(seed=0)
        )
        datasets.append(
            (
                f"synthetic ({world.users} users, {world.items} items)",
                lambda seed, w=world: SyntheticWorld(replace(w, seed=seed)).interactions(),
                False,
            )
        )
    if args.movielens is not None:
        from model_handlers.movielens import load_movielens

        base = load_movielens(args.movielens, min_rating=args.min_rating)
        name = args.movielens.name
        datasets.append((f"MovieLens {name}", lambda seed: base, False))
        if args.subsamples:
            for kind in args.only_subsamples or SUBSAMPLES:
                datasets.append(
                    (
                        f"MovieLens {name}, {kind}",
                        lambda seed, k=kind: subsample(base, k, seed),
                        True,
                    )
                )

    results: dict[str, Any] = {}
    for title, make, derived in datasets:
        runs = []
        count = args.subsample_seeds if derived and args.subsample_seeds else seeds
        for seed in range(count):
            log = make(seed)
            started = time.monotonic()
            runs.append(
                run(
                    log,
                    seed,
                    # The two-tower model takes minutes per run: not on the subsamples.
                    two_tower=not args.no_two_tower and not derived,
                    quick=args.quick,
                    index_recall=seed == 0,
                )
            )
            print(
                f"{title} seed {seed}: {len(log)} interactions, {log.num_users} users, "
                f"{log.num_items} items; ease ndcg@10 {runs[-1]['ease']['ndcg@10']:.4f}, "
                f"als {runs[-1]['als']['ndcg@10']:.4f} ({time.monotonic() - started:.0f}s)",
                flush=True,
            )
        results[title] = runs
        print("\n" + table(title, runs) + "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
