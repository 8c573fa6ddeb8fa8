"""Events on the wire: bytes per event and CPU per event, Avro against JSON.

The same generated events (the mix the gateway sends: 32-hex event ids, signed
request ids on clicks and impressions, a model version, dwell times on dwell events)
are encoded and decoded in both formats, one event at a time as producers and the
feature job do:

- encode: JSON is `Event.to_json` (pydantic's serializer), Avro is
  `recsys_contracts.event_wire.encode_event` (header + fastavro schemaless writer);
- decode, validated: what a consumer runs, `decode_event` on each format (JSON:
  pydantic's JSON parser and validation in one go; Avro: fastavro's reader, then
  the same model validation);
- decode, codec only: `json.loads` against fastavro's reader, no validation: how
  much of the validated cost is the format and how much the model.

Each figure is the median of the repeats, with the spread (min-max) across them;
ratios are Avro / JSON from the same run.

    .venv/bin/python benchmarks/event_codec.py            # 20,000 events, 3 repeats
    .venv/bin/python benchmarks/event_codec.py --quick    # 2,000 events, 3 repeats, < 10 s
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# benchmarks/gateway.py would shadow the gateway package (not imported here, but keep
# the benchmarks' import path alike).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import fastavro  # noqa: E402

from recsys_contracts.event_wire import (  # noqa: E402
    HEADER_SIZE,
    SCHEMA_VERSION,
    SCHEMAS,
    WireFormat,
    decode_event,
    encode_event,
)
from recsys_contracts.events import Event, EventType  # noqa: E402

BASE_TS = 1_767_225_600_000
TYPE_MIX = [  # roughly what a recommender sees: many impressions and views, few purchases
    (EventType.IMPRESSION, 0.45),
    (EventType.VIEW, 0.25),
    (EventType.CLICK, 0.18),
    (EventType.DWELL, 0.09),
    (EventType.PURCHASE, 0.03),
]


def generated_events(count: int, seed: int) -> list[Event]:
    rng = random.Random(seed)
    types, weights = zip(*TYPE_MIX, strict=True)
    events = []
    for n in range(count):
        kind = rng.choices(types, weights)[0]
        attributed = kind in (EventType.IMPRESSION, EventType.CLICK) or rng.random() < 0.3
        request_id = (
            f"{rng.getrandbits(128):032x}{rng.getrandbits(128):032x}.stable.v3"
            if attributed
            else None
        )
        events.append(
            Event(
                event_id=f"{rng.getrandbits(128):032x}",
                user_id=f"u{rng.randrange(1_000_000)}",
                item_id=f"i{rng.randrange(100_000)}",
                type=kind,
                ts=BASE_TS + n * 7,
                dwell_ms=rng.randrange(100, 120_000) if kind is EventType.DWELL else None,
                request_id=request_id,
                model_version="v3" if attributed else None,
            )
        )
    return events


def per_event_us(work: Callable[[], object], count: int) -> float:
    """CPU microseconds per event of one pass of `work` over `count` events."""
    started = time.process_time()
    work()
    return (time.process_time() - started) / count * 1e6


def avro_codec_only(payloads: Sequence[bytes]) -> None:
    schema = SCHEMAS[SCHEMA_VERSION]
    for payload in payloads:
        body = io.BytesIO(payload)
        body.seek(HEADER_SIZE)
        fastavro.schemaless_reader(body, schema, None)


def measure(events: list[Event]) -> dict[str, float]:
    """One repeat: every figure once, the two formats interleaved so drift hits both."""
    n = len(events)
    as_json = [encode_event(e, WireFormat.JSON) for e in events]
    as_avro = [encode_event(e, WireFormat.AVRO) for e in events]
    assert [decode_event(p) for p in as_avro] == events  # the benchmark measures a codec that works
    return {
        "bytes_json": sum(map(len, as_json)) / n,
        "bytes_avro": sum(map(len, as_avro)) / n,
        "encode_json": per_event_us(lambda: [encode_event(e, WireFormat.JSON) for e in events], n),
        "encode_avro": per_event_us(lambda: [encode_event(e, WireFormat.AVRO) for e in events], n),
        "decode_json": per_event_us(lambda: [decode_event(p) for p in as_json], n),
        "decode_avro": per_event_us(lambda: [decode_event(p) for p in as_avro], n),
        "codec_json": per_event_us(lambda: [json.loads(p) for p in as_json], n),
        "codec_avro": per_event_us(lambda: avro_codec_only(as_avro), n),
    }


def summary(values: list[float], unit: str, digits: int) -> str:
    """`median unit (spread min-max)` of the repeats."""
    median = f"{statistics.median(values):.{digits}f}" + (f" {unit}" if unit else "")
    return f"{median} (spread {min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2,000 events")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    count = 2_000 if args.quick else args.events
    print(
        f"machine {platform.machine()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
        f"fastavro {fastavro.__version__}, {count:,} events x {args.repeats} repeats",
        flush=True,
    )
    events = generated_events(count, args.seed)
    runs = [measure(events) for _ in range(args.repeats)]
    figures = {name: [run[name] for run in runs] for name in runs[0]}

    def ratio(name: str) -> list[float]:
        return [run[f"{name}_avro"] / run[f"{name}_json"] for run in runs]

    rows = [
        ("bytes per event", "bytes", "B", 1),
        ("encode CPU per event", "encode", "us", 2),
        ("decode + validate CPU per event", "decode", "us", 2),
        ("decode CPU per event, codec only", "codec", "us", 2),
    ]
    for title, name, unit, digits in rows:
        print(
            f"{title}: JSON {summary(figures[f'{name}_json'], unit, digits)}, "
            f"Avro {summary(figures[f'{name}_avro'], unit, digits)}, "
            f"ratio Avro/JSON {summary(ratio(name), '', 2)}"
        )
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
