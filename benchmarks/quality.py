"""Offline retrieval quality: the two-tower model against popularity and item-kNN.

Recall@10, Recall@50 and NDCG@10 on a chronological split (the last 10% of the time
span), seen items excluded, as `recsys train` computes them. On the default synthetic
world over several seeds (mean and spread), and on a MovieLens ratings file when
`--movielens PATH` is given (nothing is downloaded).

    python benchmarks/quality.py
    python benchmarks/quality.py --seeds 3 --movielens ~/data/ml-1m/ratings.dat --min-rating 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from model_handlers.interactions import Interactions
from model_handlers.movielens import load_movielens
from model_handlers.synthetic import SyntheticConfig, SyntheticWorld
from model_handlers.training import TrainingConfig, train_two_tower

MODELS = ("two_tower", "item_knn", "popularity")
METRICS = ("recall@10", "recall@50", "ndcg@10")


def run(log: Interactions, config: TrainingConfig) -> dict[str, Any]:
    started = time.monotonic()
    trained = train_two_tower(log, config)
    metrics = trained.metrics
    return {
        **{m: metrics[m] for m in MODELS},
        "users_evaluated": metrics["protocol"]["users_evaluated"],
        "best_epoch": metrics["training"]["best_epoch"],
        "seconds": round(time.monotonic() - started, 1),
    }


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Mean ± standard deviation over runs, per model and metric."""
    out: dict[str, dict[str, str]] = {}
    for model in MODELS:
        out[model] = {}
        for metric in METRICS:
            values = np.array([r[model][metric] for r in runs])
            spread = f" ± {values.std(ddof=1):.4f}" if len(values) > 1 else ""
            out[model][metric] = f"{values.mean():.4f}{spread}"
    return out


def ratios(runs: list[dict[str, Any]]) -> dict[str, float]:
    mean = {m: {k: np.mean([r[m][k] for r in runs]) for k in METRICS} for m in MODELS}
    return {
        f"two_tower/{base} {k}": round(float(mean["two_tower"][k] / mean[base][k]), 2)
        for base in ("popularity", "item_knn")
        for k in METRICS
    }


def table(title: str, runs: list[dict[str, Any]]) -> str:
    agg = aggregate(runs)
    lines = [f"### {title}", "", "| model | " + " | ".join(METRICS) + " |", "|---|---|---|---|"]
    for model in MODELS:
        lines.append(f"| {model} | " + " | ".join(agg[model][k] for k in METRICS) + " |")
    users = sorted({r["users_evaluated"] for r in runs})
    seconds = [r["seconds"] for r in runs]
    lines.append("")
    lines.append(
        f"{len(runs)} run(s); users evaluated: {users}; training+evaluation {min(seconds)}–{max(seconds)} s per run"
    )
    lines.append(f"ratios of means: {ratios(runs)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seeds", type=int, default=3, help="synthetic worlds (and training seeds) to average"
    )
    parser.add_argument("--users", type=int, default=SyntheticConfig.users)
    parser.add_argument("--items", type=int, default=SyntheticConfig.items)
    parser.add_argument("--dim", type=int, default=TrainingConfig.dim)
    parser.add_argument("--epochs", type=int, default=TrainingConfig.max_epochs)
    parser.add_argument("--movielens", type=Path, default=None, help="a MovieLens ratings file")
    parser.add_argument(
        "--min-rating", type=float, default=0.0, help="MovieLens: ignore lower ratings"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[str, Any] = {}
    synthetic_runs = []
    for seed in range(args.seeds):
        log = SyntheticWorld(
            SyntheticConfig(users=args.users, items=args.items, seed=seed)
        ).interactions()
        print(f"synthetic seed {seed}: {len(log)} interactions", flush=True)
        synthetic_runs.append(
            run(log, TrainingConfig(dim=args.dim, max_epochs=args.epochs, seed=seed))
        )
        print(json.dumps(synthetic_runs[-1]), flush=True)
    results["synthetic"] = synthetic_runs
    print()
    print(
        table(f"synthetic ({args.users} users, {args.items} items, default world)", synthetic_runs)
    )

    if args.movielens is not None:
        log = load_movielens(args.movielens, min_rating=args.min_rating)
        print(
            f"\nMovieLens {args.movielens}: {len(log)} interactions, {log.num_users} users, {log.num_items} items"
        )
        movielens_run = run(log, TrainingConfig(dim=args.dim, max_epochs=args.epochs))
        results["movielens"] = [movielens_run]
        print(
            table(
                f"MovieLens ({args.movielens.name}, min rating {args.min_rating})", [movielens_run]
            )
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
