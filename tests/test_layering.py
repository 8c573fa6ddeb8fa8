"""The layering rule (CONTRIBUTING.md), checked on every import in the source tree.

- `recsys_contracts` is the bottom: it imports no other package of the project.
- The data plane (`stream_jobs`, `gateway`, `model_handlers`) imports only the contracts
  besides itself, so each deployable ships without the operator and the others.
- The operator's own layers (api, render, controller, rollout, ...) import no data-plane
  package. Only the composition roots wire the two together: the CLI (`recsys_operator.cli`)
  and local mode (`recsys_operator.local`), which runs data-plane processes on one machine.

Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "recsys_contracts": ROOT / "contracts",
    "recsys_operator": ROOT / "operator",
    "stream_jobs": ROOT / "stream_jobs",
    "gateway": ROOT / "gateway",
    "model_handlers": ROOT / "model_handlers",
}
DATA_PLANE = {"stream_jobs", "gateway", "model_handlers"}
COMPOSITION_ROOTS = ("recsys_operator.cli", "recsys_operator.local")


def allowed_imports(module: str) -> set[str]:
    """The project's top-level packages `module` may import (besides its own)."""
    package = module.split(".")[0]
    if package == "recsys_contracts":
        return set()
    if package in DATA_PLANE:
        return {"recsys_contracts"}
    if module.startswith(COMPOSITION_ROOTS):
        return set(PACKAGES)
    return {"recsys_contracts"}


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every absolute import of a project package in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if n.split(".")[0] in PACKAGES]
    return found


def modules() -> list[tuple[str, Path]]:
    out = []
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out.append((".".join((package, *parts)), path))
    return out


def layering_violations() -> list[str]:
    violations = []
    for module, path in modules():
        own = module.split(".")[0]
        allowed = allowed_imports(module) | {own}
        for line, imported in project_imports(path):
            if imported.split(".")[0] not in allowed:
                violations.append(f"{path.relative_to(ROOT)}:{line}: {module} imports {imported}")
    return violations


def test_every_import_follows_the_layering_rule() -> None:
    assert layering_violations() == []


def test_the_walk_sees_every_package() -> None:
    seen = {module.split(".")[0] for module, _ in modules()}
    assert seen == set(PACKAGES)
    assert len(modules()) > 80  # a broken glob would pass the rule vacuously


@pytest.mark.parametrize(
    ("module", "source", "forbidden"),
    [
        ("gateway.app", "from recsys_operator import __version__\n", "recsys_operator"),
        ("stream_jobs.cli", "def f():\n    import model_handlers.cli\n", "model_handlers.cli"),
        ("recsys_contracts.events", "from gateway.routing import Routing\n", "gateway.routing"),
        (
            "recsys_operator.render.serving",
            "import model_handlers.archive\n",
            "model_handlers.archive",
        ),
    ],
)
def test_a_forbidden_import_is_found(
    tmp_path: Path, module: str, source: str, forbidden: str
) -> None:
    path = tmp_path / "probe.py"
    path.write_text(source)
    imported = [name for _, name in project_imports(path)]
    assert imported == [forbidden]
    assert forbidden.split(".")[0] not in allowed_imports(module)


# Each shared contract is defined in exactly one module of recsys_contracts.
CONTRACT_NAMES = (
    "MODEL_VERSION_PATTERN",
    "FALLBACK_MODEL_VERSION",
    "ROUTING_KEY",
    "SubscriptionType",
    "Routing",
    "Endpoint",
    "Variant",
    "ArchiveManifest",
    "IndexSpec",
    "ApiModel",
    "InvalidEvent",
    "USER_ID_PATTERN",
    "GATEWAY_LATENCY",
    "IMPRESSIONS",
    "CLICKS",
    "ITEM_EMBEDDINGS",
    "ModelServerEnv",
    "GatewayEnv",
)


def definitions(name: str) -> list[str]:
    where = []
    for module, path in modules():
        for node in ast.parse(path.read_text()).body:
            targets: list[str] = []
            if isinstance(node, ast.ClassDef):
                targets = [node.name]
            elif isinstance(node, ast.Assign):
                targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                targets = [node.target.id]
            if name in targets:
                where.append(module)
    return where


@pytest.mark.parametrize("name", CONTRACT_NAMES)
def test_each_contract_is_defined_once_in_the_contracts_package(name: str) -> None:
    where = definitions(name)
    assert len(where) == 1 and where[0].startswith("recsys_contracts."), where
