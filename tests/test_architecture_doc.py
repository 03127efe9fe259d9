"""docs/architecture.md stays true: it names every module, its layers are the imports' layers, and
its count of the C++ entries' checks is the code's."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "architecture.md").read_text()
# The bands of the layer diagram, top (imported) to bottom (importing); a band's packages may
# import each other.
BANDS = [{"triton", "_C"}, {"ops"}, {"packing", "models"}, {"distributed", "training", "memory", "demo"}, {"cli"},
         {"integrations"}]
BAND = {pkg: i for i, band in enumerate(BANDS) for pkg in band}


def _modules() -> list[Path]:
    return sorted(p for p in (ROOT / "spin_kernels").rglob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", [*_modules(), *sorted((ROOT / "csrc").iterdir())],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_is_named(path):
    assert re.search(rf"(?<![\w.]){re.escape(path.name)}", DOC), f"docs/architecture.md does not name {path.name}"


def _imported_packages(path: Path) -> set[str]:
    rel = path.relative_to(ROOT / "spin_kernels").parts
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:  # relative: from the module's own package
            parts = [*rel[:len(rel) - node.level], *filter(None, (node.module or "").split("."))]
            out.add((parts or [node.names[0].name])[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("spin_kernels."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("spin_kernels."))
    return {p.removesuffix(".py") for p in out}


def test_layers_import_only_the_layers_above():
    wrong = []
    for path in _modules():
        pkg = path.relative_to(ROOT / "spin_kernels").parts[0].removesuffix(".py")
        for dep in _imported_packages(path) - {pkg}:
            if dep in BAND and BAND[dep] > BAND[pkg]:
                wrong.append(f"{path.relative_to(ROOT)} imports {dep}")
    assert not wrong, wrong


def test_the_count_of_csrc_checks_is_the_code_s():
    count = sum(p.read_text().count("TORCH_CHECK(") for p in (ROOT / "csrc").iterdir())
    assert f"{count} TORCH_CHECKs" in DOC
