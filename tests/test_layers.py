"""The packages import only those below them: shared <- core <- engine <- services, cli; and
services and cli never import each other (nor does anything shipped import tests or bench)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"shared": 0, "core": 1, "engine": 2, "services": 3, "cli": 3}
NEVER = {"tests", "bench", "testkit"}


def imported_packages(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", list(LAYERS))
def test_a_package_imports_only_packages_below_it(package: str) -> None:
    level = LAYERS[package]
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in imported_packages(path):
            if name in NEVER or (name in LAYERS and name != package and LAYERS[name] >= level):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_bench_does_not_import_tests() -> None:
    wrong = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "bench").rglob("*.py")
        if "tests" in imported_packages(path)
    ]
    assert not wrong, wrong
