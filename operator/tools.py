"""Where the project's external binaries come from.

helm, kubectl and pulsar-lite are unpacked by scripts/setup.sh into `.tools/bin`
of the source tree (never committed); system binaries (java, redis-server,
prometheus, promtool) come from PATH. `RECSYS_TOOLS_DIR` overrides the folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from recsys_contracts.env_vars import OperatorEnv

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def tools_dir() -> Path:
    return Path(os.environ.get(OperatorEnv.TOOLS_DIR, PROJECT_ROOT / ".tools" / "bin"))


class ToolNotFound(FileNotFoundError):
    pass


def find_tool(name: str) -> str:
    """Absolute path of `name`, from the tools folder first, then PATH."""
    local = tools_dir() / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found:
        return found
    raise ToolNotFound(
        f"{name} not found in {tools_dir()} or on PATH; run `make setup` (scripts/setup.sh) first"
    )
