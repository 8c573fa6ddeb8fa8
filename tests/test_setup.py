"""What scripts/setup.sh promises: the tools folder holds working helm, kubectl
and pulsar-lite, and every package folder is installed under its import name."""

from __future__ import annotations

import importlib
import subprocess
import tomllib
from pathlib import Path

import pytest

from recsys_operator.tools import find_tool, tools_dir

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.tools
def test_helm_runs_from_the_tools_folder() -> None:
    helm = find_tool("helm")
    assert Path(helm).parent == tools_dir()
    out = subprocess.run([helm, "version", "--short"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("v4."), out


@pytest.mark.tools
def test_kubectl_runs_from_the_tools_folder() -> None:
    kubectl = find_tool("kubectl")
    assert Path(kubectl).parent == tools_dir()
    out = subprocess.run(
        [kubectl, "version", "--client"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "v1.35" in out.stdout, out


@pytest.mark.broker
def test_pulsar_lite_runs_from_the_tools_folder() -> None:
    broker = find_tool("pulsar-lite")
    assert Path(broker).parent == tools_dir()
    out = subprocess.run([broker, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--config" in out.stdout


def test_every_package_folder_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {v: k for k, v in config["package-dir"].items()}  # folder -> import name
    expected = set()
    for folder, name in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            expected.add(".".join([name, *rel.parts]))
    assert expected == set(config["packages"])
    for package in sorted(expected):
        importlib.import_module(package)
