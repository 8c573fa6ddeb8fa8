"""Every benchmark still runs: each script's `--quick` mode, end to end, as users run it.

A benchmark nobody runs rots (one started a test helper from a folder that had moved).
These runs are smoke tests, not measurements: they check that the script finishes and
prints each of its figures, never what the figures are. Real figures come from full
runs (`make bench`), recorded in benchmarks/README.md.

Adding a benchmark is one entry in BENCHMARKS: the script, its quick arguments, the
figures its output must show (regular expressions), and the markers of what it needs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"[-+]?[\d,]*\.?\d+"


@dataclass(frozen=True)
class QuickRun:
    script: str
    args: tuple[str, ...]
    figures: tuple[str, ...]  # regular expressions, each must match a line of the output
    timeout_s: float


def quick(
    script: str, *args: str, figures: list[str], marks: list[pytest.MarkDecorator], timeout_s: float
) -> object:
    run = QuickRun(script, ("--quick", *args), tuple(figures), timeout_s)
    # One xdist worker runs them all, one at a time: each loads the machine on its own.
    group = pytest.mark.xdist_group("benchmarks")
    return pytest.param(run, marks=[pytest.mark.slow, group, *marks], id=Path(script).stem)


BENCHMARKS = [
    quick(
        "benchmarks/rollout_analysis.py",
        figures=[rf"A/A false rollback rate: {NUMBER}", rf"power at 10% worse: {NUMBER}"],
        marks=[],
        timeout_s=120,
    ),
    quick(
        "benchmarks/gateway.py",
        "--upstream",
        "stub",
        figures=[
            rf"concurrency_1: direct p50 +{NUMBER} ms .* gateway p50 +{NUMBER} ms .* ratio p50 {NUMBER}",
            rf"concurrency_32: direct p50 +{NUMBER} ms .* gateway CPU {NUMBER} ms/request",
            rf"weight_change_s: median {NUMBER} s, max {NUMBER} s",
            rf"rollback_s: median {NUMBER} s, max {NUMBER} s",
            rf"admission_off: goodput {NUMBER} req/s, shed {NUMBER}%, fallback {NUMBER}%, "
            rf"served p99 {NUMBER} ms, 503 p99 {NUMBER} ms",
            rf"admission_on: goodput {NUMBER} req/s, shed {NUMBER}%, fallback {NUMBER}%, "
            rf"served p99 {NUMBER} ms, 503 p99 {NUMBER} ms",
            rf"admission: goodput ratio on/off {NUMBER}, all p99 ratio on/off {NUMBER}",
        ],
        marks=[pytest.mark.broker],
        timeout_s=60,
    ),
    quick(
        "benchmarks/http_server.py",
        figures=[
            rf"concurrency +{c}: CPU per request lean {NUMBER} ms .* aiohttp {NUMBER} ms .* ratio {NUMBER}"
            for c in (1, 32)
        ],
        marks=[],
        timeout_s=60,
    ),
    quick(
        "benchmarks/stream_features.py",
        figures=[
            rf"raw consume-and-ack loop: {NUMBER} events/s",
            rf"feature job, one process: {NUMBER} events/s \(CPU per event: job {NUMBER} ms",
            rf"ratio job / raw: {NUMBER}",
            rf"freshness at {NUMBER} events/s .*: p50 {NUMBER} ms, p99 {NUMBER} ms",
            rf"redis CPU per event: {NUMBER} us",
            rf"two processes {NUMBER} events/s .* ratio two / one: {NUMBER}",
            rf"batch path in-process \(no broker\): job {NUMBER} us CPU/event",
        ],
        marks=[pytest.mark.broker, pytest.mark.redis],
        timeout_s=90,
    ),
    quick(
        "benchmarks/event_codec.py",
        figures=[
            rf"bytes per event: JSON {NUMBER} B .* Avro {NUMBER} B .* ratio Avro/JSON {NUMBER}",
            rf"encode CPU per event: JSON {NUMBER} us .* Avro {NUMBER} us .* ratio Avro/JSON {NUMBER}",
            rf"decode \+ validate CPU per event: JSON {NUMBER} us .* ratio Avro/JSON {NUMBER}",
            rf"decode CPU per event, codec only: JSON {NUMBER} us .* ratio Avro/JSON {NUMBER}",
        ],
        marks=[],
        timeout_s=60,
    ),
    quick(
        "benchmarks/event_log.py",
        figures=[
            rf"floor: {NUMBER} events/s",
            rf"sink_folder: {NUMBER} events/s, ratio to floor {NUMBER}, {NUMBER} Parquet bytes/event",
            rf"sink_s3_moto: {NUMBER} events/s, ratio to floor {NUMBER}",
        ],
        marks=[pytest.mark.broker],
        timeout_s=90,
    ),
    quick(
        "benchmarks/operator_reconcile.py",
        figures=[
            rf"floor: {NUMBER} child objects created directly in {NUMBER} s",
            rf"all Ready after {NUMBER} s \({NUMBER}x the floor\)",
            rf"API requests: {NUMBER} for {NUMBER} reconciles = {NUMBER} per reconcile",
            rf"operator writes per system created: {NUMBER} \(Events {NUMBER}; goal <= 25\)",
            rf"steady state: {NUMBER} resync reconciles in {NUMBER} s, {NUMBER} requests .* 0 writes",
            rf"steady state Events: {NUMBER} = {NUMBER} per system per hour",
        ],
        marks=[],
        timeout_s=120,
    ),
    quick(
        "benchmarks/serving.py",
        figures=[
            r"FAISS device: ",
            rf"\| Flat \| 2,000 \| {NUMBER} \| \(a\) FAISS, 1 query \| {NUMBER} \| {NUMBER} \| {NUMBER} \|",
            rf"\| Flat \| 2,000 \| {NUMBER} \| \(c\) HTTP, concurrency 1, maxBatchSize 1 \| {NUMBER} \|",
            rf"\| Flat \| 2,000 \| {NUMBER} \| \(c\) HTTP, concurrency 1, maxBatchSize 1, cache hit \| {NUMBER} \|",
            rf"\| Flat \| 2,000 \| {NUMBER} \| \(c\) HTTP, concurrency 32, maxBatchSize 32 \| {NUMBER} \|",
            r"Flat: ratios at p50 \{.+\}, HTTP answers equal in-process: 100%",
            rf"Flat: answer cache on 256 session requests: hit rate {NUMBER}, p50 hit {NUMBER} ms",
        ],
        marks=[pytest.mark.java],
        timeout_s=180,
    ),
    quick(
        "benchmarks/end_to_end.py",
        figures=[
            rf"50/s: target 50/s sent {NUMBER}/s answered {NUMBER}/s .* p50 {NUMBER} ms p99 {NUMBER} ms",
            rf"n {NUMBER}, clicks {NUMBER}, CTR {NUMBER}% \(expected from the lists {NUMBER}%\)",
            rf"answered / target at 50/s: {NUMBER}",
        ],
        marks=[pytest.mark.java, pytest.mark.redis, pytest.mark.broker, pytest.mark.prometheus],
        timeout_s=180,
    ),
]


@pytest.mark.parametrize("run", BENCHMARKS)
def test_the_quick_run_finishes_and_prints_its_figures(run: QuickRun) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the suite shares its cores
    done = subprocess.run(
        [sys.executable, run.script, *run.args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=run.timeout_s,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    missing = [f for f in run.figures if not re.search(f, output)]
    assert not missing, f"figures not printed: {missing}\n{output[-4000:]}"
