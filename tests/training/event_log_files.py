"""Offline event logs for the training tests, written with pyarrow in the sink's layout:
`<root>/interactions/date=YYYY-MM-DD/hour=HH/*.parquet`, one row per event."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model_handlers.interactions import Interactions

HOUR_MS = 3_600_000


def write_event_log(
    root: Path,
    log: Interactions,
    *,
    event_type: str = "click",
    model_version: str | None = "1",
    first_event: int = 0,
) -> int:
    """Append `log`'s rows as events (ids `e<n>` from `first_event`), one file per hour
    partition; returns the number of events written."""
    n = len(log)
    table = pa.table(
        {
            "event_id": [f"e{first_event + r}" for r in range(n)],
            "user_id": [log.user_ids[u] for u in log.user.tolist()],
            "item_id": [log.item_ids[i] for i in log.item.tolist()],
            "type": [event_type] * n,
            "ts": pa.array(log.timestamp_ms, pa.int64()),
            "dwell_ms": pa.array(log.dwell_ms.astype(np.int64), pa.int64()),
            "request_id": pa.array([None] * n, pa.string()),
            "model_version": pa.array([model_version] * n, pa.string()),
        }
    )
    hours = log.timestamp_ms // HOUR_MS
    for hour in np.unique(hours):
        start = dt.datetime.fromtimestamp(int(hour) * HOUR_MS / 1000, dt.UTC)
        folder = root / "interactions" / f"date={start:%Y-%m-%d}" / f"hour={start:%H}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            table.filter(pa.array(hours == hour)), folder / f"part-{first_event}.parquet"
        )
    return n
