"""Packing a trained model into a versioned TorchServe archive (`.mar`).

Steps: check the model directory; validate name, version, index and top-k with the
rules the API's `ModelSpec` applies too (`recsys_contracts`); build the FAISS index from the item embeddings and
measure its recall@10 against exact search; write `manifest.json`; run
torch-model-archiver (store-only zip: embeddings do not compress) with the handler;
move the result to `<out>/<name>-<version>.mar`.

The archiver runs as a subprocess with a private temporary folder: it stages files in
`$TMPDIR/<model name>`, which two builds of the same model at once would share.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import faiss
import numpy as np
import torch

from model_handlers.item_index import (
    ItemIndex,
    build_index,
    measure_recall,
    perturbed_item_queries,
)
from model_handlers.model_directory import (
    missing_files,
    read_item_embeddings,
    read_query_sample,
    read_training_metrics,
    read_user_ids,
)
from model_handlers.two_tower import TowerConfig
from recsys_contracts import archive_layout as files
from recsys_contracts.api_base import DNS_LABEL_PATTERN
from recsys_contracts.archive_layout import ArchiveManifest, IndexReport, ServingDefaults
from recsys_contracts.index_spec import IndexSpec, index_fit_problems
from recsys_contracts.model_version import MODEL_VERSION_PATTERN

HANDLER_SOURCE = Path(__file__).with_name(files.HANDLER_FILE)
RECALL_QUERIES = 1000
ARCHIVER = (
    "from model_archiver.model_packaging import generate_model_archive; generate_model_archive()"
)
"""torch-model-archiver's entry point, run with this Python (`-m` would warn)."""


class ArchiveError(ValueError):
    """The model directory or the parameters cannot make an archive; says why."""


@dataclass(frozen=True)
class ArchiveRequest:
    model_dir: Path
    out_dir: Path
    name: str
    version: str
    index: IndexSpec
    top_k: int = 50
    serving: ServingDefaults = field(default_factory=ServingDefaults)
    force: bool = False
    """Overwrite an existing archive of the same name and version."""


@dataclass(frozen=True)
class BuiltArchive:
    path: Path
    manifest: ArchiveManifest


Progress = Callable[[str], None]


def model_parameter_problems(
    request: ArchiveRequest, *, embedding_dim: int, num_items: int
) -> list[str]:
    """What makes `request` an archive the API would refuse to serve (empty: nothing)."""
    problems = []
    if len(request.name) > 63 or not re.fullmatch(DNS_LABEL_PATTERN, request.name):
        problems.append(f"name: {request.name!r} is not a DNS label (a-z, 0-9, '-')")
    if not re.fullmatch(MODEL_VERSION_PATTERN, request.version):
        problems.append(f"version: {request.version!r} must match {MODEL_VERSION_PATTERN}")
    if not 1 <= request.top_k <= 1000:
        problems.append(f"top_k: {request.top_k} must be between 1 and 1000")
    fit = index_fit_problems(
        request.index, embedding_dim=embedding_dim, num_items=num_items, top_k=request.top_k
    )
    problems += [f"model.{field}: {message}" for field, message in fit]
    return problems


def build_archive(request: ArchiveRequest, *, on_progress: Progress | None = None) -> BuiltArchive:
    say = on_progress or (lambda message: None)
    model_dir = request.model_dir
    missing = missing_files(model_dir)
    if missing:
        raise ArchiveError(
            f"{model_dir} is not a trained model directory (missing {', '.join(missing)}); "
            "run `recsys train` first"
        )
    target = request.out_dir / files.mar_file_name(request.name, request.version)
    if target.exists() and not request.force:
        raise ArchiveError(f"{target} exists; give another version or --force to overwrite it")

    tower = TowerConfig.from_json((model_dir / files.USER_TOWER_CONFIG).read_text())
    embeddings = np.ascontiguousarray(read_item_embeddings(model_dir), dtype=np.float32)
    num_items, dim = embeddings.shape
    if dim != tower.dim or num_items != tower.num_items:
        raise ArchiveError(
            f"item_embeddings.npy is {num_items}x{dim} but the tower expects "
            f"{tower.num_items}x{tower.dim}"
        )
    problems = model_parameter_problems(request, embedding_dim=dim, num_items=num_items)
    if problems:
        raise ArchiveError(f"invalid model parameters: {'; '.join(problems)}")

    say(f"building the {request.index.type} index over {num_items} items ({dim}-d)")
    started = time.monotonic()
    index = ItemIndex(build_index(embeddings, request.index), request.index)
    build_seconds = time.monotonic() - started
    queries = read_query_sample(model_dir)
    source = "user_histories"
    if queries is None or len(queries) == 0:
        queries, source = perturbed_item_queries(embeddings, RECALL_QUERIES), "perturbed_items"
    recall = measure_recall(index, embeddings, queries[:RECALL_QUERIES], k=min(10, num_items))
    say(
        f"index recall@10 against exact search: {recall:.4f} ({len(queries[:RECALL_QUERIES])} queries)"
    )

    manifest = ArchiveManifest(
        model_name=request.name,
        model_version=request.version,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        embedding_dim=dim,
        num_items=num_items,
        num_users=len(read_user_ids(model_dir)),
        history_length=tower.history_length,
        top_k=request.top_k,
        index=request.index,
        index_report=IndexReport(
            recall_at_10=round(recall, 4),
            queries=len(queries[:RECALL_QUERIES]),
            query_source=source,
            build_seconds=round(build_seconds, 2),
        ),
        training_metrics=read_training_metrics(model_dir),
        serving=request.serving,
        software=_software_versions(),
    )

    request.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="recsys-archive-") as work:
        stage = Path(work) / "files"
        stage.mkdir()
        for name in files.TRAINED_MODEL_FILES:
            shutil.copy2(model_dir / name, stage / name)
        if (model_dir / files.QUERY_SAMPLE).is_file():
            shutil.copy2(model_dir / files.QUERY_SAMPLE, stage / files.QUERY_SAMPLE)
        index.save(stage / files.ITEM_INDEX)
        (stage / files.MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
        say("packing the archive with torch-model-archiver")
        packed = _run_archiver(request.name, request.version, stage, Path(work))
        tmp_target = target.with_name(target.name + ".partial")
        shutil.move(packed, tmp_target)
        tmp_target.replace(target)
    return BuiltArchive(path=target, manifest=manifest)


def _run_archiver(name: str, model_version: str, stage: Path, work: Path) -> Path:
    export = work / "export"
    export.mkdir()
    private_tmp = work / "tmp"
    private_tmp.mkdir()
    argv = [
        sys.executable, "-c", ARCHIVER,
        "--model-name", name,
        "--version", model_version,
        "--handler", str(HANDLER_SOURCE),
        "--extra-files", str(stage),
        "--export-path", str(export),
        "--archive-format", "zip-store",
    ]  # fmt: skip
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env={**_clean_env(), "TMPDIR": str(private_tmp)},
        check=False,
    )
    packed = export / f"{name}.mar"
    if result.returncode != 0 or not packed.is_file():
        raise ArchiveError(
            f"torch-model-archiver failed (exit {result.returncode}): "
            f"{(result.stderr or result.stdout).strip()[-2000:]}"
        )
    return packed


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("TMPDIR", "TEMP", "TMP")}


def _software_versions() -> dict[str, str]:
    versions = {"torch": torch.__version__, "faiss": faiss.__version__, "numpy": np.__version__}
    with contextlib.suppress(PackageNotFoundError):
        versions["recsys-operator"] = version("recsys-operator")
    return versions
