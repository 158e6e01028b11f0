"""The package keeps the floors the README's architecture map names: no module imports from its own floor or above."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import airflow_provider_doc2x
from tests.helpers import REPO

#: The package under test: the checkout's, or the installed wheel's when ``.ci/run`` tests the wheel.
PACKAGE = Path(airflow_provider_doc2x.__file__).resolve().parent


def floors() -> dict[str, int]:
    """The README's map: module (or subpackage) -> floor."""
    section = (REPO / "README.md").read_text().split("## Architecture", 1)[1]
    block = section.split("```", 2)[1]
    return {name: int(floor) for floor, name in re.findall(r"^floor (\d+)\s+(\w+)", block, re.MULTILINE)}


def unit(module: str) -> str:
    """``airflow_provider_doc2x.hooks.doc2x`` -> ``hooks``: what the map names."""
    return module.split(".")[1]


def imports() -> dict[str, set[str]]:
    """Each unit of the package -> the units it imports (at module level or inside functions)."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        if relative.parts == ("airflow_provider_doc2x", "__init__"):
            continue
        own = unit(".".join(relative.parts))
        names = found.setdefault(own, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("airflow_provider_doc2x"):
                if node.module == "airflow_provider_doc2x":
                    names.update(alias.name for alias in node.names if alias.name != "__version__")
                else:
                    names.add(unit(node.module))
        names.discard(own)
    return found


def test_every_module_is_on_the_map():
    assert set(imports()) == set(floors())


def test_no_module_imports_from_its_own_floor_or_above():
    floor = floors()
    upward = [
        f"{importer} (floor {floor[importer]}) imports {imported} (floor {floor[imported]})"
        for importer, imported_units in imports().items()
        for imported in imported_units
        if floor[imported] >= floor[importer]
    ]
    assert upward == []
