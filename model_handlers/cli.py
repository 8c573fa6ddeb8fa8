"""`recsys` commands of the model side: `data synth`, `train`, `evaluate`, `tune`, `archive`,
`retrain`.

Each command parses its options, calls the pure module that does the work, and shows
progress and results with rich; errors are one line on stderr and exit code 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from model_handlers.interactions import Interactions

console = Console(stderr=True, soft_wrap=True)

data_app = typer.Typer(
    help="Interaction data for training: synthetic with a known ground truth.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@contextmanager
def _clear_errors() -> Iterator[None]:
    """Known failures become one line on stderr and exit code 1, not a traceback."""
    from model_handlers.archive import ArchiveError
    from model_handlers.interaction_files import InteractionFileError
    from model_handlers.item_index import IndexBuildError
    from model_handlers.movielens import MovieLensFormatError

    try:
        yield
    except (
        ArchiveError,
        IndexBuildError,
        InteractionFileError,
        MovieLensFormatError,
        FileNotFoundError,
        ValueError,
    ) as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None


@data_app.command("synth")
def synth(
    out: Annotated[
        Path, typer.Option(help="Folder to write interactions.npz and synthetic.json into.")
    ] = Path("artifacts/data/synthetic"),
    users: Annotated[int, typer.Option(min=1, help="Number of users.")] = 2000,
    items: Annotated[int, typer.Option(min=1, help="Number of items.")] = 5000,
    categories: Annotated[int, typer.Option(min=1, help="Number of item categories.")] = 20,
    latent_dim: Annotated[
        int, typer.Option(min=1, help="Dimension of the ground-truth latent vectors.")
    ] = 16,
    sessions: Annotated[float, typer.Option(min=0.1, help="Mean sessions per user.")] = 4.0,
    session_length: Annotated[
        float, typer.Option(min=1.0, help="Mean interactions per session.")
    ] = 8.0,
    days: Annotated[
        float, typer.Option(min=0.1, help="Length of the simulated period in days.")
    ] = 30.0,
    popularity_exponent: Annotated[
        float, typer.Option(min=0.0, help="Zipf exponent of item popularity (0: uniform).")
    ] = 1.0,
    drift: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="How far user interests move over the period (0..1)."),
    ] = 0.5,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same data.")] = 0,
) -> None:
    """Generate synthetic interactions with ground truth (deterministic by seed).

    Users have drifting latent preferences, items a power-law popularity and a
    category; sessions carry dwell times. synthetic.json regenerates the ground truth
    (click probabilities) for simulations.
    """
    import numpy as np

    from model_handlers.synthetic import SyntheticConfig, write_synthetic_dataset

    with _clear_errors():
        config = SyntheticConfig(
            users=users,
            items=items,
            categories=categories,
            latent_dim=latent_dim,
            sessions_per_user=sessions,
            session_length=session_length,
            days=days,
            popularity_exponent=popularity_exponent,
            drift=drift,
            seed=seed,
        )
        with console.status("sampling interactions"):
            log = write_synthetic_dataset(config, out)
    counts = np.sort(log.item_counts())[::-1]
    top = max(1, len(counts) // 100)
    console.print(
        f"wrote {out}/: {len(log)} interactions, {log.num_users} users, {log.num_items} items, "
        f"{log.num_categories} categories; the top 1% of items get {counts[:top].sum() / counts.sum():.0%} "
        "of interactions",
        highlight=False,
    )


UserCol = Annotated[str, typer.Option(help="CSV/Parquet: the user id column.")]
ItemCol = Annotated[str, typer.Option(help="CSV/Parquet: the item id column.")]
TimeCol = Annotated[
    str, typer.Option(help="CSV/Parquet: the time column (seconds, ms or timestamps).")
]
WeightCol = Annotated[
    str | None,
    typer.Option(help="CSV/Parquet: a weight/rating column (rows below --min-rating are dropped)."),
]


def _read_log(
    path: Path,
    user_col: str,
    item_col: str,
    time_col: str,
    weight_col: str | None,
    min_rating: float,
) -> Interactions:
    """Interactions from any file or folder the commands accept (`train --data`): a
    `recsys data synth` folder or its .npz, a MovieLens ratings file, or CSV/Parquet."""
    from model_handlers.interaction_files import Columns, load_interactions
    from model_handlers.interactions import Interactions
    from model_handlers.synthetic import INTERACTIONS_FILE

    if path.is_dir() or path.suffix == ".npz":
        npz = path / INTERACTIONS_FILE if path.is_dir() else path
        if not npz.is_file():
            raise FileNotFoundError(f"no interactions at {npz}; run `recsys data synth` first")
        return Interactions.load(npz)
    if not path.exists():
        raise FileNotFoundError(
            f"no interactions at {path}; run `recsys data synth` first, or give a ratings, "
            "CSV or Parquet file"
        )
    return load_interactions(
        path,
        Columns(user=user_col, item=item_col, time=time_col, weight=weight_col),
        min_weight=min_rating,
    )


def train(
    out: Annotated[Path, typer.Option(help="Model directory to write.")] = Path("artifacts/model"),
    data: Annotated[
        Path | None,
        typer.Option(
            help="Interactions: a `recsys data synth` folder (or its interactions.npz), a MovieLens "
            "ratings file (u.data, ratings.dat, ratings.csv), or a CSV/Parquet file with named columns."
        ),
    ] = None,
    movielens: Annotated[
        Path | None,
        typer.Option(help="A MovieLens ratings file (same as --data FILE)."),
    ] = None,
    model: Annotated[
        str, typer.Option(help="ease (recency-weighted EASE, the default) or two_tower.")
    ] = "ease",
    min_rating: Annotated[
        float, typer.Option(help="Ratings (or --weight-col values) below this are ignored.")
    ] = 0.0,
    user_col: UserCol = "user_id",
    item_col: ItemCol = "item_id",
    time_col: TimeCol = "timestamp",
    weight_col: WeightCol = None,
    dim: Annotated[
        int | None,
        typer.Option(
            min=2,
            help="Served embedding dimension (spec.model.embeddingDim); default 64 for "
            "two_tower, 256 EASE components for ease.",
        ),
    ] = None,
    history: Annotated[
        int, typer.Option(min=1, help="two_tower: recent items the user tower pools.")
    ] = 20,
    epochs: Annotated[
        int,
        typer.Option(min=1, help="two_tower: most epochs (early stopping usually ends sooner)."),
    ] = 15,
    min_epochs: Annotated[
        int, typer.Option(min=1, help="two_tower: epochs before early stopping may stop.")
    ] = 3,
    patience: Annotated[
        int, typer.Option(min=1, help="two_tower: epochs without improvement before stopping.")
    ] = 3,
    batch_size: Annotated[
        int, typer.Option(min=2, help="two_tower: examples per batch (in-batch negatives).")
    ] = 512,
    learning_rate: Annotated[
        float, typer.Option(min=0.0, help="two_tower: Adam learning rate.")
    ] = 0.005,
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads for torch and numpy.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config", help="Settings written by `recsys tune` (replace the model options)."
        ),
    ] = None,
) -> None:
    """Train a retrieval model and compare it with popularity and item-kNN on a
    validation holdout (each user's last 20% of the training data).

    The default model is EASE with recency weighting: its regularisation and recency
    half-life are chosen on the holdout, then it is refitted on all the data. Without
    --data or --movielens, trains on a default synthetic dataset. Writes the user tower,
    item ids and embeddings, popularity and metrics.json to --out.
    """
    from dataclasses import replace

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from model_handlers.ease import EaseConfig
    from model_handlers.model_directory import write_trained_model
    from model_handlers.synthetic import SyntheticConfig, SyntheticWorld
    from model_handlers.training import MODELS, EpochReport, TrainingConfig, train_model

    if data is not None and movielens is not None:
        console.print("[red]error:[/red] give --data or --movielens, not both")
        raise typer.Exit(1)
    if model not in MODELS:
        console.print(f"[red]error:[/red] --model must be one of {', '.join(MODELS)}")
        raise typer.Exit(1)
    _limit_threads(threads)
    with _clear_errors():
        tuned: TrainingConfig | None = None
        if config_file is not None:  # before the data: a wrong path should not wait for it
            from model_handlers.tuning import read_config

            if not config_file.is_file():
                raise FileNotFoundError(f"--config {config_file}: no such file")
            tuned = read_config(config_file)
            model = tuned.model
        source_path = movielens or data
        if source_path is not None:
            log = _read_log(source_path, user_col, item_col, time_col, weight_col, min_rating)
            source = str(source_path)
        else:
            with console.status("generating the default synthetic dataset"):
                log = SyntheticWorld(SyntheticConfig(seed=seed)).interactions()
            source = "synthetic (defaults)"
        console.print(
            f"training {model} on {source}: {len(log)} interactions, {log.num_users} users, {log.num_items} items",
            highlight=False,
        )
        config = TrainingConfig(
            model=model,
            ease=replace(EaseConfig(), rank=dim or EaseConfig().rank),
            dim=dim or TrainingConfig().dim,
            history_length=history,
            max_epochs=epochs,
            min_epochs=min(min_epochs, epochs),
            patience=patience,
            batch_size=batch_size,
            learning_rate=learning_rate,
            seed=seed,
            threads=threads,
        )
        if tuned is not None:
            config = replace(tuned, seed=seed, threads=threads)
        with Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task("train", total=None, epoch=1, loss=float("nan"))

            def on_step(epoch: int, step: int, steps: int, loss: float) -> None:
                progress.update(task, completed=step, total=steps, epoch=epoch, loss=loss)

            def on_epoch(report: EpochReport) -> None:
                if report.refit:
                    line = f"refit on all data, epoch {report.epoch}: loss {report.loss:.3f}"
                else:
                    v = report.validation
                    line = (
                        f"epoch {report.epoch}: loss {report.loss:.3f}, validation recall@10 "
                        f"{v['recall@10']:.4f} recall@50 {v['recall@50']:.4f} ndcg@10 {v['ndcg@10']:.4f}"
                    )
                progress.console.print(f"{line} ({report.seconds:.1f}s)", highlight=False)

            def on_message(message: str) -> None:
                progress.console.print(message, highlight=False)

            trained = train_model(
                log, config, on_step=on_step, on_epoch=on_epoch, on_message=on_message
            )
        write_trained_model(trained, out)
    metrics = trained.metrics
    table = Table(
        title=f"validation holdout ({metrics['protocol']['users_evaluated']} users, "
        "each user's last 20% of the training data)"
    )
    for column in ("model", "recall@10", "recall@50", "ndcg@10", "mrr@10", "coverage@10"):
        table.add_column(column)
    for name in (model, "item_knn", "popularity"):
        m = metrics[name]
        table.add_row(
            name,
            *(
                f"{m[c]:.4f}"
                for c in ("recall@10", "recall@50", "ndcg@10", "mrr@10", "coverage@10")
            ),
        )
    console.print(table)
    training = metrics["training"]
    chosen = (
        f"selected {training['selected']}"
        if model == "ease"
        else f"best epoch {training['best_epoch']} (refitted on all data)"
    )
    console.print(f"{chosen}; wrote {out}/ (metrics in metrics.json)", highlight=False)


def evaluate(
    model: Annotated[Path, typer.Option(help="Model directory written by `recsys train`.")],
    train: Annotated[
        Path,
        typer.Option(help="Interactions the model may use as history (excluded from rankings)."),
    ],
    test: Annotated[Path, typer.Option(help="Held-out interactions: the targets.")],
    output: Annotated[
        str, typer.Option("--output", "-o", help="table or json (on stdout).")
    ] = "table",
    min_rating: Annotated[
        float, typer.Option(help="Ratings (or --weight-col values) below this are ignored.")
    ] = 0.0,
    user_col: UserCol = "user_id",
    item_col: ItemCol = "item_id",
    time_col: TimeCol = "timestamp",
    weight_col: WeightCol = None,
) -> None:
    """Score a trained model on a held-out file with the project's protocol.

    Every test user with history in --train counts; their --train items are never
    recommended; Recall@10 = hits / min(10, |test items|), NDCG@10 with binary relevance,
    MRR@10, catalogue coverage@10; means over users with 95% intervals.
    """
    import json

    from model_handlers.model_evaluation import evaluate_model_directory, report

    if output not in ("table", "json"):
        console.print("[red]error:[/red] --output must be table or json")
        raise typer.Exit(1)
    with _clear_errors():
        if not (model / "user_tower.json").is_file():
            raise FileNotFoundError(
                f"{model} is not a model directory (no user_tower.json); run `recsys train`"
            )
        train_log = _read_log(train, user_col, item_col, time_col, weight_col, min_rating)
        test_log = _read_log(test, user_col, item_col, time_col, weight_col, min_rating)
        result = report(evaluate_model_directory(model, train_log, test_log))
    if output == "json":
        typer.echo(json.dumps(result))
        return
    table = Table(title=f"{model}: {result['users']} users")
    table.add_column("metric")
    table.add_column("mean")
    table.add_column("95% interval")
    ci = result["ci95"]
    for name, value in result["metrics"].items():  # type: ignore[attr-defined]
        half = ci.get(name)  # type: ignore[attr-defined]
        table.add_row(name, f"{value:.4f}", f"± {half:.4f}" if half is not None else "")
    Console().print(table)


def tune(
    data: Annotated[
        Path,
        typer.Option(
            help="Training interactions: a `recsys data synth` folder or its .npz, a ratings "
            "file, or CSV/Parquet."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Where to write the best settings (JSON).")] = Path(
        "artifacts/tuned.json"
    ),
    model: Annotated[str, typer.Option(help="ease or two_tower.")] = "ease",
    trials: Annotated[int, typer.Option(min=1, help="Most trials.")] = 50,
    timeout: Annotated[
        float | None, typer.Option(min=1, help="Stop starting trials after this many seconds.")
    ] = None,
    min_rating: Annotated[float, typer.Option(help="Ratings below this are ignored.")] = 0.0,
    user_col: UserCol = "user_id",
    item_col: ItemCol = "item_id",
    time_col: TimeCol = "timestamp",
    weight_col: WeightCol = None,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the search.")] = 0,
) -> None:
    """Search the trainer's hyperparameters with Optuna, scored on the validation
    holdout of --data only (each user's last 20%), and write the best settings for
    `recsys train --config`."""
    from model_handlers.training import MODELS, TrainingConfig

    if model not in MODELS:
        console.print(f"[red]error:[/red] --model must be one of {', '.join(MODELS)}")
        raise typer.Exit(1)
    try:
        from model_handlers.tuning import tune as run_tune
        from model_handlers.tuning import write_config
    except ImportError:
        console.print(
            "[red]error:[/red] recsys tune needs Optuna: pip install 'recsys-operator[tune]'"
        )
        raise typer.Exit(1) from None
    _limit_threads(threads)
    with _clear_errors():
        log = _read_log(data, user_col, item_col, time_col, weight_col, min_rating)
        console.print(
            f"tuning {model} on {data}: {len(log)} interactions; up to {trials} trials"
            + (f" or {timeout:.0f}s" if timeout else ""),
            highlight=False,
        )

        def on_trial(number: int, value: float, best: float, params: dict[str, object]) -> None:
            shown = ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items()
            )
            console.print(
                f"trial {number}: validation ndcg@10 {value:.4f} (best {best:.4f}) - {shown}",
                highlight=False,
            )

        result = run_tune(
            log,
            TrainingConfig(model=model, seed=seed, threads=threads),
            trials=trials,
            timeout_s=timeout,
            on_trial=on_trial,
        )
        write_config(
            result.config, out, validation_ndcg_at_10=result.best_value, trials=result.trials
        )
    console.print(
        f"best validation ndcg@10 {result.best_value:.4f} after {result.trials} trials "
        f"({result.seconds:.0f}s); wrote {out} (use: recsys train --config {out})",
        highlight=False,
    )


def _limit_threads(threads: int | None) -> None:
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
    except ImportError:  # numpy then uses its own default
        pass


def archive(
    model_dir: Annotated[
        Path, typer.Option(help="Model directory written by `recsys train`.")
    ] = Path("artifacts/model"),
    out: Annotated[
        Path, typer.Option(help="Model store folder to write <name>-<version>.mar into.")
    ] = Path("artifacts/model_store"),
    name: Annotated[str, typer.Option(help="Model name (spec.model.name).")] = "retrieval",
    version: Annotated[str, typer.Option(help="Model version (spec.model.version).")] = "1",
    index: Annotated[str, typer.Option(help="Index type: Flat, HNSW, IVF-PQ or SQ8.")] = "HNSW",
    hnsw_m: Annotated[int, typer.Option(help="HNSW: neighbours per node.")] = 32,
    hnsw_ef_construction: Annotated[
        int, typer.Option(help="HNSW: candidate list while building.")
    ] = 40,
    hnsw_ef_search: Annotated[int, typer.Option(help="HNSW: candidate list while searching.")] = 64,
    ivf_nlist: Annotated[int, typer.Option(help="IVF-PQ: inverted lists.")] = 1024,
    pq_m: Annotated[
        int, typer.Option(help="IVF-PQ: sub-quantizers (must divide the dimension).")
    ] = 8,
    pq_nbits: Annotated[int, typer.Option(help="IVF-PQ: bits per code.")] = 8,
    nprobe: Annotated[int, typer.Option(help="IVF-PQ: lists visited per query.")] = 16,
    refine_factor: Annotated[
        int,
        typer.Option(
            help="IVF-PQ: re-rank this many times k candidates exactly (1: no re-ranking; "
            "above 1 the index keeps the full vectors)."
        ),
    ] = 1,
    top_k: Annotated[
        int, typer.Option(help="Largest k a request may ask for (and the default).")
    ] = 50,
    redis_url: Annotated[
        str | None, typer.Option(help="Default feature store URL (RECSYS_REDIS_URL overrides it).")
    ] = None,
    system_id: Annotated[
        str | None,
        typer.Option(
            help="Default <namespace>.<name> feature-key prefix (RECSYS_SYSTEM_ID overrides)."
        ),
    ] = None,
    quantize_tower: Annotated[
        bool, typer.Option(help="Serve the user tower with int8 dynamic quantization.")
    ] = False,
    force: Annotated[
        bool, typer.Option(help="Overwrite an existing archive of this version.")
    ] = False,
) -> None:
    """Build the FAISS index, measure its recall, and pack a versioned TorchServe archive.

    The archive holds the handler, the user tower, item_ids.json, item_embeddings.npy,
    the index, popularity, metrics and manifest.json.
    """
    from pydantic import ValidationError

    from model_handlers.archive import ArchiveRequest, build_archive
    from recsys_contracts.archive_layout import ServingDefaults
    from recsys_contracts.field_issues import issues_from_validation_error
    from recsys_contracts.index_spec import IndexSpec

    with _clear_errors():
        try:
            spec = IndexSpec.model_validate(
                {
                    "type": index,
                    "hnsw": {
                        "m": hnsw_m,
                        "efConstruction": hnsw_ef_construction,
                        "efSearch": hnsw_ef_search,
                    },
                    "ivfpq": {
                        "nlist": ivf_nlist,
                        "m": pq_m,
                        "nbits": pq_nbits,
                        "nprobe": nprobe,
                        "refineFactor": refine_factor,
                    },
                }
            )
        except ValidationError as exc:
            problems = "; ".join(str(i) for i in issues_from_validation_error(exc, "index"))
            raise ValueError(f"invalid index parameters: {problems}") from None
        request = ArchiveRequest(
            model_dir=model_dir,
            out_dir=out,
            name=name,
            version=version,
            index=spec,
            top_k=top_k,
            serving=ServingDefaults(
                redis_url=redis_url, system_id=system_id, quantize_tower=quantize_tower
            ),
            force=force,
        )
        with console.status("archiving") as status:
            built = build_archive(request, on_progress=lambda message: status.update(message))
    report = built.manifest.index_report
    console.print(
        f"wrote {built.path} ({built.path.stat().st_size / 2**20:.1f} MiB): {spec.type} index, "
        f"recall@10 {report.recall_at_10:.4f} on {report.queries} held-out queries, "
        f"built in {report.build_seconds:.1f}s",
        highlight=False,
    )


def retrain(
    log: Annotated[
        str,
        typer.Option(
            help="Offline event log root: a folder, file:// or s3:// (holds interactions/)."
        ),
    ],
    model_store: Annotated[
        str,
        typer.Option(
            help="Model store: a folder, file:// or s3://BUCKET/PREFIX; holds the stable "
            "archive, and where a candidate goes."
        ),
    ],
    name: Annotated[str, typer.Option(help="Model name (spec.model.name).")] = "retrieval",
    stable_version: Annotated[
        str | None,
        typer.Option(help="Version serving now, scored on the same slice (omit on a first run)."),
    ] = None,
    version: Annotated[
        str | None,
        typer.Option(help="Candidate version; default: the window's end as YYYYMMDD-HHMMSS."),
    ] = None,
    window: Annotated[str, typer.Option(help="How far back the log is read, e.g. 7d, 12h.")] = "7d",
    until: Annotated[
        str | None,
        typer.Option(help="End of the window (RFC 3339 or epoch ms); default: now."),
    ] = None,
    metric: Annotated[str, typer.Option(help="Gate metric: ndcg, recall or mrr at k.")] = "ndcg@10",
    min_improvement: Annotated[
        float,
        typer.Option(help="Candidate must score at least stable x (1 + this), e.g. 0.02."),
    ] = 0.0,
    min_users: Annotated[
        int, typer.Option(min=1, help="Users in the held-out slice needed to judge.")
    ] = 100,
    min_interactions: Annotated[
        int, typer.Option(min=1, help="Interactions the window needs before training.")
    ] = 1000,
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads for torch and numpy.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    verdict_file: Annotated[
        Path | None,
        typer.Option(
            help="Also write the verdict (one line of JSON) here, e.g. /dev/termination-log "
            "in a Kubernetes Job, where the operator reads it from the pod's status."
        ),
    ] = None,
) -> None:
    """Train a candidate from a window of the event log and ship it only if it beats the stable.

    Each user's newest 20% of the window is held out; the candidate (recency EASE)
    trains on the rest; both it and --stable-version (from its archive in
    --model-store) are scored on the held-out slice. The candidate is packed into the
    model store (with the stable's index and serving settings) only when the gate
    passes. The verdict is printed as JSON on stdout and written to
    <model-store>/<name>.training.json. An s3:// log or model store is reached with
    botocore's environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ... or the pod's
    role). Exit 0 when the run completed (passed or gated out), 1 when it failed.
    """
    import datetime as dt
    from dataclasses import replace

    from model_handlers.continuous_training import Gate, TrainingRun, run_training
    from model_handlers.training import TrainingConfig
    from recsys_contracts.api_base import parse_duration
    from recsys_contracts.training_report import GateResult

    _limit_threads(threads)
    with _clear_errors():
        if until is None:
            end = dt.datetime.now(dt.UTC)
        elif until.isdigit():
            end = dt.datetime.fromtimestamp(int(until) / 1000, dt.UTC)
        else:
            try:
                end = dt.datetime.fromisoformat(until).astimezone(dt.UTC)
            except ValueError:
                raise ValueError(
                    f"--until {until!r}: give RFC 3339 (2026-12-01T00:00:00Z) or epoch ms"
                ) from None
        until_ms = int(end.timestamp() * 1000)
        try:
            since_ms = until_ms - int(parse_duration(window) * 1000)
        except ValueError as exc:
            raise ValueError(f"--window {window!r}: {exc}") from None
        run = TrainingRun(
            log_uri=log,
            model_store=model_store,
            model_name=name,
            candidate_version=version or f"{end:%Y%m%d-%H%M%S}",
            since_ms=since_ms,
            until_ms=until_ms,
            stable_version=stable_version,
            gate=Gate(
                metric=metric,
                min_relative_improvement=min_improvement,
                min_users=min_users,
                min_interactions=min_interactions,
            ),
            training=replace(TrainingConfig(), seed=seed, threads=threads),
        )
        verdict = run_training(run, say=lambda m: console.print(m, highlight=False))
    console.print(f"{verdict.result.value}: {verdict.reason}", highlight=False)
    line = verdict.model_dump_json(by_alias=True)
    if verdict_file is not None:
        verdict_file.write_text(line + "\n")
    typer.echo(line)
    if verdict.result is GateResult.FAILED:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add this package's commands to the `recsys` CLI."""
    app.add_typer(data_app, name="data")
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("tune")(tune)
    app.command("archive")(archive)
    app.command("retrain")(retrain)
