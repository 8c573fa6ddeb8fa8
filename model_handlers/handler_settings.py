"""The handler's settings: environment variables first, then the archive's defaults.

| variable | default | meaning |
|---|---|---|
| `RECSYS_REDIS_URL` | manifest `serving.redis_url` | feature store; unset and no default: no online features |
| `RECSYS_REDIS_MODE` | `single` | `cluster`: the URL names one node of a Redis Cluster (`recsys_contracts.store_endpoint`) |
| `RECSYS_REDIS_PASSWORD` | none | password for the feature store |
| `RECSYS_SYSTEM_ID` | manifest `serving.system_id` | `<namespace>.<name>`, the feature-key prefix; required with a store |
| `RECSYS_STORE_TIMEOUT_MS` | 50 | feature-store connect/read timeout; past it the batch goes on without |
| `RECSYS_MAX_K` | manifest `top_k` | largest k a request may ask for, and the default k |
| `RECSYS_QUANTIZE_TOWER` | manifest `serving.quantize_tower` | `true`: int8 dynamic quantization of the user tower |
| `RECSYS_FAISS_DEVICE` | `auto` | `auto` (GPU when FAISS sees one), `cpu` or `gpu` |
| `RECSYS_MODEL_VERSION` | none | when set, must equal the archive's version (a pod given the wrong archive fails to load) |
| `RECSYS_CACHE_MAX_ENTRIES` | 10000 | answers kept per worker for repeat requests of a user whose state did not change; 0: no cache |
| `RECSYS_CACHE_TTL_MS` | 60000 | how long a cached answer is kept |
| `RECSYS_SESSION_WEIGHT` | 1.5 | weight of the recent items' vector added to the tower's query (`model_handlers.session_rerank`); 0: no session stage. With no `RECSYS_SESSION_*` set the stage is on for two-tower models and off for EASE |
| `RECSYS_SESSION_ITEMS` | 5 | newest recent items in that vector |
| `RECSYS_SESSION_DECAY` | 0.5 | weight of a recent item relative to the next newer one |
| `RECSYS_SESSION_POPULARITY_WEIGHT` | 0.025 | popularity prior of the re-ranking, per unit of log(1 + training count) |
| `RECSYS_SESSION_CANDIDATES` | 100 | items fetched with the blended query and re-ranked |

An empty variable counts as unset. A value that does not parse stops the model from
loading with a message naming the variable, rather than serving with a guess.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from model_handlers.session_rerank import SessionStage, SessionStageError
from recsys_contracts.archive_layout import ArchiveManifest
from recsys_contracts.env_vars import ModelServerEnv
from recsys_contracts.store_endpoint import StoreMode, endpoint_problem

REDIS_URL = ModelServerEnv.REDIS_URL
REDIS_MODE = ModelServerEnv.REDIS_MODE
REDIS_PASSWORD = ModelServerEnv.REDIS_PASSWORD
SYSTEM_ID = ModelServerEnv.SYSTEM_ID
STORE_TIMEOUT_MS = ModelServerEnv.STORE_TIMEOUT_MS
MAX_K = ModelServerEnv.MAX_K
QUANTIZE_TOWER = ModelServerEnv.QUANTIZE_TOWER
FAISS_DEVICE = ModelServerEnv.FAISS_DEVICE
MODEL_VERSION = ModelServerEnv.MODEL_VERSION
CACHE_MAX_ENTRIES = ModelServerEnv.CACHE_MAX_ENTRIES
CACHE_TTL_MS = ModelServerEnv.CACHE_TTL_MS
SESSION_WEIGHT = ModelServerEnv.SESSION_WEIGHT
SESSION_ITEMS = ModelServerEnv.SESSION_ITEMS
SESSION_DECAY = ModelServerEnv.SESSION_DECAY
SESSION_POPULARITY_WEIGHT = ModelServerEnv.SESSION_POPULARITY_WEIGHT
SESSION_CANDIDATES = ModelServerEnv.SESSION_CANDIDATES
DEFAULT_CACHE_MAX_ENTRIES = 10_000
DEFAULT_CACHE_TTL_MS = 60_000.0
ENVIRONMENT_VARIABLES = ModelServerEnv.ALL

FaissDevice = Literal["auto", "cpu", "gpu"]


class SettingsError(ValueError):
    """An environment variable has a value the handler cannot use."""


@dataclass(frozen=True)
class HandlerSettings:
    redis_url: str | None
    redis_password: str | None
    system_id: str | None
    store_timeout_s: float
    max_k: int
    quantize_tower: bool
    faiss_device: FaissDevice
    redis_mode: StoreMode = StoreMode.SINGLE
    cache_max_entries: int = DEFAULT_CACHE_MAX_ENTRIES
    """0: no cache."""
    cache_ttl_s: float = DEFAULT_CACHE_TTL_MS / 1000.0
    session: SessionStage | None = None
    """None (no session variable set): the model's default (`Retriever.load`): on for a
    two-tower model, off for EASE."""

    @property
    def use_gpu(self) -> bool | None:
        """For `ItemIndex.load`: None lets FAISS decide."""
        return {"auto": None, "cpu": False, "gpu": True}[self.faiss_device]

    @classmethod
    def resolve(cls, env: Mapping[str, str], manifest: ArchiveManifest) -> HandlerSettings:
        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        expected_version = get(MODEL_VERSION)
        if expected_version is not None and expected_version != manifest.model_version:
            raise SettingsError(
                f"{MODEL_VERSION}={expected_version} but the archive holds version "
                f"{manifest.model_version} of {manifest.model_name}"
            )
        redis_url = get(REDIS_URL) or manifest.serving.redis_url
        system_id = get(SYSTEM_ID) or manifest.serving.system_id
        if redis_url and not system_id:
            raise SettingsError(
                f"{SYSTEM_ID} is required with a feature store ({REDIS_URL}={redis_url}): "
                "it is the <namespace>.<name> prefix of the feature keys"
            )
        mode = get(REDIS_MODE) or StoreMode.SINGLE.value
        if mode not in tuple(StoreMode):
            raise SettingsError(f"{REDIS_MODE} must be single or cluster, got {mode!r}")
        problem = endpoint_problem(redis_url, mode) if redis_url else None
        if problem:
            raise SettingsError(f"{REDIS_URL}/{REDIS_MODE}: {problem}")
        timeout_ms = _number(get(STORE_TIMEOUT_MS), STORE_TIMEOUT_MS, default=50.0)
        if timeout_ms <= 0:
            raise SettingsError(f"{STORE_TIMEOUT_MS} must be positive, got {timeout_ms}")
        max_k = int(_number(get(MAX_K), MAX_K, default=float(manifest.top_k)))
        if not 1 <= max_k <= manifest.num_items:
            raise SettingsError(
                f"{MAX_K} must be between 1 and the catalogue size {manifest.num_items}, got {max_k}"
            )
        quantize = _flag(
            get(QUANTIZE_TOWER), QUANTIZE_TOWER, default=manifest.serving.quantize_tower
        )
        device = get(FAISS_DEVICE) or "auto"
        if device not in ("auto", "cpu", "gpu"):
            raise SettingsError(f"{FAISS_DEVICE} must be auto, cpu or gpu, got {device!r}")
        cache_entries = _number(
            get(CACHE_MAX_ENTRIES), CACHE_MAX_ENTRIES, default=DEFAULT_CACHE_MAX_ENTRIES
        )
        if cache_entries < 0 or cache_entries != int(cache_entries):
            raise SettingsError(
                f"{CACHE_MAX_ENTRIES} must be a whole number, 0 or more, got {cache_entries}"
            )
        cache_ttl_ms = _number(get(CACHE_TTL_MS), CACHE_TTL_MS, default=DEFAULT_CACHE_TTL_MS)
        if cache_ttl_ms <= 0:
            raise SettingsError(f"{CACHE_TTL_MS} must be positive, got {cache_ttl_ms}")
        return cls(
            session=_session_stage(get),
            redis_url=redis_url,
            redis_password=get(REDIS_PASSWORD),
            redis_mode=StoreMode(mode),
            system_id=system_id,
            store_timeout_s=timeout_ms / 1000.0,
            max_k=max_k,
            quantize_tower=quantize,
            faiss_device=device,  # type: ignore[arg-type]
            cache_max_entries=int(cache_entries),
            cache_ttl_s=cache_ttl_ms / 1000.0,
        )


def _session_stage(get: Callable[[str], str | None]) -> SessionStage | None:
    names = (SESSION_WEIGHT, SESSION_ITEMS, SESSION_DECAY, SESSION_POPULARITY_WEIGHT)
    if all(get(name) is None for name in (*names, SESSION_CANDIDATES)):
        return None
    defaults = SessionStage()
    weight = _number(get(SESSION_WEIGHT), SESSION_WEIGHT, default=defaults.weight)
    items = _number(get(SESSION_ITEMS), SESSION_ITEMS, default=defaults.items)
    decay = _number(get(SESSION_DECAY), SESSION_DECAY, default=defaults.decay)
    popularity = _number(
        get(SESSION_POPULARITY_WEIGHT),
        SESSION_POPULARITY_WEIGHT,
        default=defaults.popularity_weight,
    )
    candidates = _number(get(SESSION_CANDIDATES), SESSION_CANDIDATES, default=defaults.candidates)
    for value, name in ((items, SESSION_ITEMS), (candidates, SESSION_CANDIDATES)):
        if value != int(value):
            raise SettingsError(f"{name} must be a whole number, got {value}")
    try:
        return SessionStage(
            weight=weight,
            items=int(items),
            decay=decay,
            popularity_weight=popularity,
            candidates=int(candidates),
        )
    except SessionStageError as error:  # its bounds, named by the variable that broke them
        variable = _SESSION_VARIABLES[error.field]
        raise SettingsError(f"{variable} {error.rule}, got {error.value}") from None


_SESSION_VARIABLES = {
    "weight": SESSION_WEIGHT,
    "items": SESSION_ITEMS,
    "decay": SESSION_DECAY,
    "popularity_weight": SESSION_POPULARITY_WEIGHT,
    "candidates": SESSION_CANDIDATES,
}


def _number(value: str | None, name: str, *, default: float) -> float:
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {value!r}") from None


def _flag(value: str | None, name: str, *, default: bool) -> bool:
    if value is None:
        return default
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be true or false, got {value!r}")
