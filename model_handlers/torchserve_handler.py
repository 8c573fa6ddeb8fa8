"""The TorchServe adapter of the retrieval handler: the file given to the archiver.

All retrieval logic lives in plain modules (`retrieval_request`, `online_features`,
`retriever`); this class only translates TorchServe's batch of requests into them and
back, sets per-request HTTP statuses, and emits the handler metrics. Another model
server would need another adapter of this size, nothing more.

TorchServe imports this file from the unpacked archive as the top-level module
`torchserve_handler` and instantiates its only class. The `model_handlers` package must
be installed in the server's Python (the model-server image does `pip install .`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import faiss
import torch

from model_handlers.handler_settings import HandlerSettings
from model_handlers.item_index import gpu_count
from model_handlers.model_directory import read_manifest
from model_handlers.online_features import OnlineRead, RedisFeatureReader, connect
from model_handlers.recommendation_cache import CachedRetriever, RecommendationCache
from model_handlers.retriever import Retriever, Source
from recsys_contracts import handler_metrics as metrics
from recsys_contracts.retrieval_request import (
    DEADLINE_HEADER,
    DEADLINE_STATUS,
    BadRequest,
    RetrievalRequest,
    deadline_passed,
    decode_body,
    parse_request,
)

log = logging.getLogger("recsys.handler")

JSON = "application/json"


class RetrievalHandler:
    """`initialize(context)` once per worker, then `handle(batch, context)` per batch."""

    def __init__(self) -> None:
        self.retriever: Retriever | None = None
        self.cached: CachedRetriever | None = None
        self.reader: RedisFeatureReader | None = None
        self.settings: HandlerSettings | None = None
        self._metrics: dict[str, Any] = {}
        self.initialized = False
        self.expired_skipped = 0  # requests answered 504 unread: past the gateway's deadline

    def initialize(self, context: Any) -> None:
        # One thread per worker: TorchServe scales with workers and batching.
        torch.set_num_threads(1)
        faiss.omp_set_num_threads(1)
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        manifest = read_manifest(model_dir)
        self.settings = settings = HandlerSettings.resolve(os.environ, manifest)
        gpu_id = properties.get("gpu_id")
        use_gpu = settings.use_gpu
        if use_gpu is None:
            use_gpu = gpu_id is not None and gpu_count() > 0
        self.retriever = Retriever.load(
            model_dir,
            use_gpu=use_gpu,
            gpu_device=int(gpu_id or 0),
            quantize_tower=settings.quantize_tower,
            max_k=settings.max_k,
            session=settings.session,
        )
        cache = (
            RecommendationCache(settings.cache_max_entries, settings.cache_ttl_s)
            if settings.cache_max_entries > 0
            else None
        )
        self.cached = CachedRetriever(self.retriever, cache)
        if settings.redis_url and settings.system_id:
            self.reader = RedisFeatureReader(
                connect(
                    settings.redis_url,
                    timeout_s=settings.store_timeout_s,
                    password=settings.redis_password,
                    mode=settings.redis_mode,
                ),
                system=settings.system_id,
                model_version=manifest.model_version,
                dim=manifest.embedding_dim,
                history_length=manifest.history_length,
            )
        self._metrics = {m.name: _declared_metric(context, m) for m in metrics.HANDLER_METRICS}
        log.info(
            "retrieval handler ready: model %s version %s, %d items, index %s on %s, store %s",
            manifest.model_name,
            manifest.model_version,
            manifest.num_items,
            manifest.index.type,
            self.retriever.index.device,
            "on" if self.reader else "off",
        )
        self.initialized = True

    def handle(self, data: list[Any], context: Any) -> list[str]:
        """One response body per request of the batch, in order; refused requests get
        their 4xx status set on the context."""
        assert self.retriever is not None and self.cached is not None
        started = time.perf_counter()
        responses: list[str] = [""] * len(data)
        requests, positions, expired = self._parse(data, context, responses)
        online: OnlineRead | None = None
        if requests:
            online = self._read_store([r.user_id for r in requests])
            batch = self.cached.recommend(
                requests,
                online.features if online else None,
                cacheable=online is None or online.error is None,
            )
            for position, recommendation in zip(positions, batch.recommendations, strict=True):
                responses[position] = json.dumps(recommendation.response())
            if batch.search_ms is not None:
                self._observe(metrics.SEARCH_LATENCY, batch.search_ms)
            self._count(
                metrics.COLD_STARTS,
                sum(r.source is Source.POPULARITY for r in batch.recommendations),
            )
            self._count(metrics.CACHE_HITS, batch.hits)
            self._count(metrics.CACHE_MISSES, batch.misses)
        self._observe(metrics.HANDLER_LATENCY, (time.perf_counter() - started) * 1000)
        self._observe(metrics.BATCH_SIZE, len(data))
        self._count(metrics.BAD_REQUESTS, len(data) - len(requests) - expired)
        if online is not None:
            self._count(metrics.STORE_MISSES, online.misses)
            self._count(metrics.STORE_ERRORS, 1 if online.error else 0)
        return responses

    def _parse(
        self, data: list[Any], context: Any, responses: list[str]
    ) -> tuple[list[RetrievalRequest], list[int], int]:
        """The valid requests and their positions; refusals are written into `responses`.

        A request past the gateway's deadline is answered 504 without being computed:
        under overload TorchServe's queue holds requests the gateway gave up on, and
        computing them only delays the ones still awaited."""
        assert self.retriever is not None and self.settings is not None
        requests, positions = [], []
        now_ms = int(time.time() * 1000)
        expired = 0
        for position, row in enumerate(data):
            context.set_response_content_type(position, JSON)
            if deadline_passed(_request_header(context, position, DEADLINE_HEADER), now_ms):
                expired += 1
                context.set_response_status(DEADLINE_STATUS, "deadline passed", position)
                responses[position] = json.dumps(
                    {
                        "error": "the request's deadline passed before it was computed",
                        "status": DEADLINE_STATUS,
                        "model_version": self.retriever.model_version,
                    }
                )
                continue
            body = _body(row)
            decoded = _json_content(context, position) and not isinstance(body, bytes | bytearray)
            try:
                request = parse_request(
                    decode_body(body, json_decoded=decoded), max_k=self.settings.max_k
                )
            except BadRequest as refused:
                context.set_response_status(
                    refused.status, _status_phrase(refused.reason), position
                )
                responses[position] = json.dumps(
                    {
                        "error": refused.reason,
                        "status": refused.status,
                        "model_version": self.retriever.model_version,
                    }
                )
                continue
            requests.append(request)
            positions.append(position)
        self.expired_skipped += expired
        return requests, positions, expired

    def _read_store(self, user_ids: list[str | None]) -> OnlineRead | None:
        """The batch's online features in one round trip (None without a store)."""
        if self.reader is None:
            return None
        started = time.perf_counter()
        online = self.reader.read(user_ids)
        self._observe(metrics.STORE_LATENCY, (time.perf_counter() - started) * 1000)
        return online

    # --- metrics ----------------------------------------------------------------------

    def _observe(self, metric: metrics.HandlerMetric, value: float) -> None:
        self._emit(metric, round(value, 4))

    def _count(self, metric: metrics.HandlerMetric, value: int) -> None:
        if value > 0:  # counters appear on first increment; skipping zeros saves log lines
            self._emit(metric, value)

    def _emit(self, metric: metrics.HandlerMetric, value: float) -> None:
        assert self.retriever is not None
        emitter = self._metrics.get(metric.name)
        if emitter is not None:
            emitter.add_or_update(value, [self.retriever.model_name, self.retriever.model_version])


def _declared_metric(context: Any, metric: metrics.HandlerMetric) -> Any:
    """TorchServe's metric object for a handler metric (declared in the metrics config;
    added to the worker's cache when the config lacks it, though TorchServe then drops it)."""
    from ts.metrics.metric_type_enum import MetricTypes

    kind = MetricTypes(metric.kind)
    try:
        return context.metrics.get_metric(metric.name, kind)
    except Exception:
        return context.metrics.add_metric_to_cache(
            metric.name, metric.unit, list(metrics.DIMENSIONS), kind
        )


def _body(row: Any) -> Any:
    """The request body in one entry of TorchServe's batch."""
    if isinstance(row, dict):
        for key in ("body", "data"):
            if row.get(key) is not None:
                return row[key]
        return None
    return row


def _request_header(context: Any, position: int, name: str) -> Any:
    """An HTTP header of one request of the batch, by case-insensitive name (None when
    absent or when the context has no headers, as in some tests)."""
    try:
        properties = context.get_all_request_header(position)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    if not isinstance(properties, dict):
        return None
    wanted = name.lower()
    for key, value in properties.items():
        text = key.decode(errors="replace") if isinstance(key, bytes | bytearray) else str(key)
        if text.lower() == wanted:
            return value
    return None


def _json_content(context: Any, position: int) -> bool:
    """Whether the request's content type is JSON: TorchServe then hands over the body
    already parsed (bytes only when parsing failed)."""
    try:
        headers = context.get_request_header(position, "body") or {}
        content_type = str(headers.get("content-type", "")) if isinstance(headers, dict) else ""
    except (AttributeError, IndexError, KeyError, TypeError):
        return False
    return content_type.split(";")[0].strip().lower() == "application/json"


def _status_phrase(reason: str) -> str:
    """An HTTP reason phrase: one line of printable ASCII."""
    phrase = "".join(c if " " <= c <= "~" else "?" for c in reason)
    return phrase[:200]
