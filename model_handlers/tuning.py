"""Hyperparameter search with Optuna, scored on the validation holdout only.

The holdout is the trainer's own (each user's last 20% of the data given), so the test
data of whoever evaluates the model later is never seen. The result is a
`TrainingConfig` as JSON, which `recsys train --config FILE` reads back.

- `ease`: λ, the recency half-life and floor, continuous (the trainer's default only
  tries a grid). The spectrum is computed once, so a trial costs one evaluation.
- `two_tower`: learning rate, temperature, dimension, history length and batch size; a
  trial is a training run with early stopping (no refit), scored by its best epoch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from model_handlers import ease
from model_handlers.evaluation import evaluate, evaluation_set, per_user_split
from model_handlers.interactions import Interactions
from model_handlers.training import TrainingConfig, train_two_tower

SCORE = "ndcg@10"


@dataclass(frozen=True)
class TuningResult:
    config: TrainingConfig
    best_value: float
    trials: int
    seconds: float


TrialCallback = Callable[[int, float, float, dict[str, Any]], None]
"""(trial number, its validation score, best so far, its parameters)."""


def tune(
    log: Interactions,
    base: TrainingConfig,
    *,
    trials: int,
    timeout_s: float | None,
    on_trial: TrialCallback | None = None,
) -> TuningResult:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.monotonic()
    objective, to_config = (
        _ease_objective(log, base) if base.model == "ease" else _two_tower_objective(log, base)
    )
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=base.seed)
    )

    def report(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if on_trial and trial.value is not None:
            on_trial(trial.number, trial.value, study.best_value, trial.params)

    if base.model == "ease":
        # Start from a setting the default grid tends to choose, so a short search cannot
        # end below it.
        study.enqueue_trial({"l2": 400.0, "half_life": 5.0, "floor": 0.0})
    study.optimize(objective, n_trials=trials, timeout=timeout_s, callbacks=[report])
    return TuningResult(
        config=to_config(study.best_params),
        best_value=study.best_value,
        trials=len(study.trials),
        seconds=round(time.monotonic() - started, 1),
    )


def _ease_objective(
    log: Interactions, base: TrainingConfig
) -> tuple[Callable[[Any], float], Callable[[dict[str, Any]], TrainingConfig]]:
    fit, validation = per_user_split(log)
    eval_set = evaluation_set(fit, validation, max_users=base.max_eval_users, seed=base.seed)
    spectrum = ease.Spectrum.of(fit, base.ease.rank, seed=base.seed)

    def objective(trial: Any) -> float:
        l2 = trial.suggest_float("l2", 10.0, 10_000.0, log=True)
        half_life = trial.suggest_float("half_life", 1.0, 200.0, log=True)
        floor = trial.suggest_float("floor", 0.0, 0.5)
        query_rows, item_vectors = spectrum.factors(l2)
        weights = ease.recency_weights(base.ease.history_length, half_life, floor)
        scorer = ease.ease_scorer(query_rows, item_vectors, weights)
        return evaluate(scorer, eval_set, cutoffs=(10,))[SCORE]

    def to_config(params: dict[str, Any]) -> TrainingConfig:
        return replace(
            base,
            ease=replace(
                base.ease,
                l2_grid=(params["l2"],),
                half_life_grid=(params["half_life"],),
                floor_grid=(params["floor"],),
            ),
        )

    return objective, to_config


def _two_tower_objective(
    log: Interactions, base: TrainingConfig
) -> tuple[Callable[[Any], float], Callable[[dict[str, Any]], TrainingConfig]]:
    def config_of(params: dict[str, Any]) -> TrainingConfig:
        return replace(
            base,
            learning_rate=params["learning_rate"],
            temperature=params["temperature"],
            dim=params["dim"],
            hidden=2 * params["dim"],
            history_length=params["history_length"],
            batch_size=params["batch_size"],
        )

    def objective(trial: Any) -> float:
        params = {
            "learning_rate": trial.suggest_float("learning_rate", 1e-4, 3e-2, log=True),
            "temperature": trial.suggest_float("temperature", 0.02, 0.3, log=True),
            "dim": trial.suggest_categorical("dim", [32, 64, 128]),
            "history_length": trial.suggest_categorical("history_length", [10, 20, 50]),
            "batch_size": trial.suggest_categorical("batch_size", [256, 512, 1024]),
        }
        trained = train_two_tower(log, replace(config_of(params), refit=False))
        return float(trained.metrics["two_tower"][SCORE])

    return objective, config_of


# --- the config file ---------------------------------------------------------------


def write_config(config: TrainingConfig, path: Path, **extra: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"training": asdict(config), **extra}, indent=2) + "\n")


def read_config(path: Path) -> TrainingConfig:
    """A `TrainingConfig` from a file `recsys tune` wrote (unknown keys are an error)."""
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc}); write it with `recsys tune`") from None
    data = document.get("training") if isinstance(document, dict) else None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: no 'training' object; write it with `recsys tune`")
    known = {f.name for f in fields(TrainingConfig)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{path}: unknown training settings {', '.join(sorted(unknown))}")
    ease_data = data.pop("ease", None) or {}
    ease_known = {f.name for f in fields(ease.EaseConfig)}
    if set(ease_data) - ease_known:
        raise ValueError(f"{path}: unknown ease settings {sorted(set(ease_data) - ease_known)}")
    ease_settings: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in ease_data.items()
    }
    ease_config = ease.EaseConfig(**ease_settings)
    return TrainingConfig(**data, ease=ease_config)
