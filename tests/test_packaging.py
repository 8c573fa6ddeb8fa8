"""What pip installs is every package of the source tree.

pyproject.toml lists the packages by hand (`[tool.setuptools] packages` and
`package-dir`), because the import names differ from some folder names
(`operator/` is `recsys_operator`, `contracts/` is `recsys_contracts`). A folder left
out installs nothing: the checkout works, the installed wheel or image fails with an
ImportError. These tests catch that before a release does.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
PACKAGE_DIR: dict[str, str] = SETUPTOOLS["package-dir"]
PACKAGES: list[str] = SETUPTOOLS["packages"]
NOT_INSTALLED = {"tests", "benchmarks", "scripts", "build", "docs", "examples", "charts"}


def python_folders(top: Path) -> list[Path]:
    """`top` and every folder below it holding Python modules (caches and data excluded)."""
    return [
        folder
        for folder in [top, *sorted(p for p in top.rglob("*") if p.is_dir())]
        if "__pycache__" not in folder.parts and any(folder.glob("*.py"))
    ]


def test_every_top_level_package_folder_has_an_import_name() -> None:
    folders = {
        path.parent.name
        for path in ROOT.glob("*/__init__.py")
        if path.parent.name not in NOT_INSTALLED
    }
    assert folders, "no package folders found"
    assert folders <= set(PACKAGE_DIR.values()), (
        f"folders missing from [tool.setuptools] package-dir: "
        f"{sorted(folders - set(PACKAGE_DIR.values()))}"
    )


def test_every_package_folder_is_listed_in_packages() -> None:
    expected = set()
    for import_name, folder in PACKAGE_DIR.items():
        top = ROOT / folder
        assert top.is_dir(), f"package-dir maps {import_name} to {folder}/, which does not exist"
        for sub in python_folders(top):
            assert (sub / "__init__.py").is_file(), (
                f"{sub.relative_to(ROOT)} holds modules but no __init__.py: "
                "setuptools would leave it out"
            )
            expected.add(".".join([import_name, *sub.relative_to(top).parts]))
    assert expected == set(PACKAGES), (
        f"missing from packages: {sorted(expected - set(PACKAGES))}; "
        f"listed but no such folder: {sorted(set(PACKAGES) - expected)}"
    )


def test_the_contracts_package_is_installed() -> None:
    # The bottom package every deployable imports: an image without it cannot start.
    assert PACKAGE_DIR.get("recsys_contracts") == "contracts"
    assert "recsys_contracts" in PACKAGES
