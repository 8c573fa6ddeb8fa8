"""What each image installs: the Dockerfile's targets, resolved through pyproject's extras.

The operator image must carry no torch, TorchServe or FAISS; each image must carry what
its own code imports. The import checks run in a fresh interpreter in which every
optional module the image does not install fails to import, as it would in the image.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import yaml

from recsys_operator.cli import OPTIONAL_MODULES
from recsys_operator.render.naming import Component, default_image

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SELF = PROJECT["name"]
HEAVY = {"torch", "torchserve", "torch-model-archiver", "faiss-cpu", "faiss-gpu"}


def dist_name(requirement: str) -> tuple[str, list[str]]:
    """('name', [extras]) of a requirement such as `recsys-operator[a,b]` or `torch==2.13.0`."""
    match = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:\[([^\]]*)\])?", requirement)
    assert match, requirement
    extras = [e.strip() for e in (match.group(2) or "").split(",") if e.strip()]
    return match.group(1).lower().replace("_", "-"), extras


def requirements(extras: list[str]) -> set[str]:
    """Distributions that `pip install .[extras]` asks for directly, extras of extras included."""
    wanted = list(PROJECT["dependencies"])
    seen: set[str] = set()
    todo = list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in PROJECT["optional-dependencies"][extra]:
            name, nested = dist_name(requirement)
            if name == SELF:
                todo += nested
            else:
                wanted.append(requirement)
    return {dist_name(r)[0] for r in wanted}


def dockerfile_stages() -> dict[str, tuple[str, list[str]]]:
    """target -> (the stage it is built FROM, its RUN commands)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["FROM"]:
            assert len(words) == 4 and words[2] == "AS", line
            current = words[3]
            stages[current] = (words[1], [])
        elif words[:1] == ["RUN"]:
            assert current is not None
            stages[current][1].append(line.strip()[4:])
    return stages


def installed(target: str) -> set[str]:
    """The distributions the target's pip commands install (with its parents' ones)."""
    stages = dockerfile_stages()
    chain: list[str] = []
    while target in stages:
        chain.insert(0, target)
        target = stages[target][0]
    dists: set[str] = set()
    for stage in chain:
        for command in stages[stage][1]:
            piped_extra = None
            for piece in re.split(r"&&|\|", command):
                words = shlex.split(piece)
                if words[:2] == ["python", "-c"]:
                    found = re.search(r'\["optional-dependencies"\]\["([a-z-]+)"\]', words[2])
                    piped_extra = found.group(1) if found else None
                if "pip" not in words:
                    continue
                words = words[words.index("pip") :]
                if words[1] == "uninstall":
                    dists -= {w for w in words[2:] if not w.startswith("-")}
                elif (
                    words[1] == "install" and words[0:1] == ["pip"] and piece.strip()[:5] == "xargs"
                ):
                    assert piped_extra, command
                    dists |= {
                        dist_name(r)[0] for r in PROJECT["optional-dependencies"][piped_extra]
                    }
                elif words[1] == "install":
                    for word in words[2:]:
                        if word == "." or word.startswith(".["):
                            dists |= requirements(dist_name("x" + word[1:])[1])
    return dists


IMAGES = {
    # target: (what must be in it, what must not)
    "operator": (set(), HEAVY | {"pulsar-client", "redis", "fastavro"}),
    "stream-jobs": ({"pulsar-client", "redis", "fastavro", "pyarrow", "fsspec", "s3fs"}, HEAVY),
    "model-server": ({"torch", "torchserve", "torch-model-archiver", "faiss-cpu", "redis"}, set()),
    "model-server-gpu": (
        {"torch", "torchserve", "torch-model-archiver", "faiss-gpu"},
        {"faiss-cpu"},
    ),
}


def test_every_image_the_chart_and_renderer_name_is_a_target() -> None:
    values = yaml.safe_load((ROOT / "charts/recsys-operator/values.yaml").read_text())
    names = {values["image"]["repository"].rpartition("/")[2]}
    for component in (Component.SERVING, Component.FEATURES, Component.GATEWAY, Component.TRAINING):
        names.add(default_image(component).rpartition("/")[2].partition(":")[0])
    gpu = default_image(Component.SERVING, gpu=True).rpartition("/")[2]
    names.add(gpu.partition(":")[0] + "-" + gpu.rpartition("-")[2])
    targets = set(dockerfile_stages())
    assert names <= targets, names - targets
    assert set(IMAGES) <= targets


@pytest.mark.parametrize("target", list(IMAGES))
def test_each_image_installs_its_own_dependencies_and_no_others(target: str) -> None:
    wanted, unwanted = IMAGES[target]
    dists = installed(target)
    assert wanted <= dists, wanted - dists
    assert not dists & unwanted, dists & unwanted
    assert set(dist_name(r)[0] for r in PROJECT["dependencies"]) <= dists


def test_the_cli_names_the_extras_that_install_each_optional_module() -> None:
    for module, (distribution, extras) in OPTIONAL_MODULES.items():
        for extra in extras:
            listed = {dist_name(r)[0] for r in PROJECT["optional-dependencies"][extra]}
            assert distribution in listed, (module, extra)
        assert distribution not in requirements([]), module  # not in the base install


BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = set(sys.argv.pop(1).split(","))

    class NotInThisImage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NotInThisImage())
    """
)


def run_without(modules: set[str], code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter in which `modules` cannot be imported."""
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code), ",".join(sorted(modules)), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def not_in(target: str) -> set[str]:
    dists = installed(target)
    return {module for module, (dist, _) in OPTIONAL_MODULES.items() if dist not in dists}


# What each image runs: the modules its processes import, and a command of the CLI.
ENTRY_POINTS = {
    "operator": (
        ["recsys_operator.controller.handlers", "recsys_operator.render"],
        ["operator", "run", "--help"],
    ),
    "stream-jobs": (
        ["stream_jobs.features", "stream_jobs.event_log_sink", "gateway.server", "gateway.app"],
        ["features", "run", "--help"],
    ),
    "model-server": (
        ["model_handlers.torchserve_handler", "model_handlers.continuous_training"],
        ["retrain", "--help"],
    ),
}


@pytest.mark.parametrize("target", list(ENTRY_POINTS))
def test_each_image_runs_with_only_what_it_installs(target: str) -> None:
    modules, command = ENTRY_POINTS[target]
    blocked = not_in(target)
    if target == "operator":
        assert {"torch", "faiss", "ts", "model_archiver"} <= blocked
    result = run_without(
        blocked,
        f"""
        import importlib, sys
        for name in {modules!r}:
            importlib.import_module(name)
        from recsys_operator.cli import main
        sys.argv = ["recsys", *{command!r}]
        main()
        """,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize(
    ("command", "blocked", "extra"),
    [
        (["train", "--epochs", "1", "--out", "{tmp}/model"], {"torch"}, "serving"),
        (["archive", "--model-dir", "{tmp}/model", "--out", "{tmp}/store"], {"faiss"}, "serving"),
        (["features", "run"], {"pulsar"}, "stream"),
    ],
)
def test_a_command_whose_extra_is_missing_says_which_to_install(
    command: list[str], blocked: set[str], extra: str, tmp_path: Path
) -> None:
    result = run_without(
        blocked,
        """
        import sys
        from recsys_operator.cli import main
        sys.argv = ["recsys", *sys.argv[1:]]
        main()
        """,
        *(word.format(tmp=tmp_path) for word in command),
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"pip install 'recsys-operator[{extra}]'" in result.stderr
    assert "Traceback" not in result.stderr
