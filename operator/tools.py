"""Where the project's external binaries come from.

helm, kubectl and pulsar-lite are unpacked by scripts/setup.sh into a tools folder
(never committed), and setup records that folder in the virtual environment it
installs into (`<venv>/recsys-tools-dir`, one line: the folder's absolute path), so an
installed package finds its tools wherever it runs from, not only from a checkout.
`RECSYS_TOOLS_DIR` overrides the recorded folder. System binaries (java, redis-server,
prometheus, promtool) come from PATH, as does everything when no folder is configured.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from recsys_contracts.env_vars import OperatorEnv

TOOLS_DIR_FILE = "recsys-tools-dir"
"""The file in the environment's prefix (`sys.prefix`) that names the tools folder."""


def configured_tools_file() -> Path:
    return Path(sys.prefix) / TOOLS_DIR_FILE


def tools_dir() -> Path | None:
    """The tools folder: `RECSYS_TOOLS_DIR`, else the one setup recorded, else None."""
    override = os.environ.get(OperatorEnv.TOOLS_DIR)
    if override:
        return Path(override)
    try:
        recorded = configured_tools_file().read_text().strip()
    except OSError:
        return None
    return Path(recorded) if recorded else None


class ToolNotFound(FileNotFoundError):
    pass


def find_tool(name: str) -> str:
    """Absolute path of `name`, from the tools folder first, then PATH."""
    folder = tools_dir()
    if folder is not None:
        local = folder / name
        if local.is_file() and os.access(local, os.X_OK):
            return str(local)
    found = shutil.which(name)
    if found:
        return found
    where = f"{folder} or on PATH" if folder is not None else "PATH (no tools folder configured)"
    raise ToolNotFound(f"{name} not found in {where}; run `make setup` (scripts/setup.sh) first")
