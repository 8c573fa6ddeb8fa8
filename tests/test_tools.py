"""Where binaries are looked up: RECSYS_TOOLS_DIR, else the folder setup recorded in the
environment (so an installed package finds them, not only a checkout), else PATH."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from recsys_contracts.env_vars import OperatorEnv
from recsys_operator.tools import TOOLS_DIR_FILE, ToolNotFound, find_tool, tools_dir


def executable(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An environment prefix of our own, with no override and an empty PATH."""
    root = tmp_path / "venv"
    root.mkdir()
    monkeypatch.setattr(sys, "prefix", str(root))
    monkeypatch.delenv(OperatorEnv.TOOLS_DIR, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    return root


def test_the_folder_recorded_by_setup_is_used(prefix: Path, tmp_path: Path) -> None:
    tools = tmp_path / "somewhere" / "bin"
    helm = executable(tools, "helm")
    (prefix / TOOLS_DIR_FILE).write_text(f"{tools}\n")
    assert tools_dir() == tools
    assert find_tool("helm") == str(helm)


def test_the_environment_variable_overrides_the_recorded_folder(
    prefix: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    executable(tmp_path / "recorded", "helm")
    (prefix / TOOLS_DIR_FILE).write_text(str(tmp_path / "recorded"))
    override = executable(tmp_path / "override", "helm")
    monkeypatch.setenv(OperatorEnv.TOOLS_DIR, str(tmp_path / "override"))
    assert find_tool("helm") == str(override)


def test_without_a_folder_tools_come_from_path(
    prefix: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_path = executable(tmp_path / "path-bin", "promtool")
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert tools_dir() is None
    assert find_tool("promtool") == str(on_path)


def test_a_missing_tool_names_where_it_was_looked_for(prefix: Path, tmp_path: Path) -> None:
    (prefix / TOOLS_DIR_FILE).write_text(str(tmp_path / "tools"))
    with pytest.raises(ToolNotFound, match=r"kubectl not found in .*tools or on PATH"):
        find_tool("kubectl")


def test_the_lookup_does_not_depend_on_the_source_tree(
    prefix: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A checkout's .tools/bin is not looked at unless setup recorded it.
    monkeypatch.chdir(tmp_path)
    executable(tmp_path / ".tools" / "bin", "pulsar-lite")
    with pytest.raises(ToolNotFound, match="no tools folder configured"):
        find_tool("pulsar-lite")
