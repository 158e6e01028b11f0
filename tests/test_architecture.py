"""The package keeps the floors of the architecture map in CONTRIBUTING.md: no module imports from its own floor or above.

Every module is on the map by its dotted name inside the package (``pdf_lane.lane``, ``storage.manifest``,
``pacing`` for ``pacing/__init__.py``), so an upward import between two modules of one subpackage
fails as surely as one between subpackages.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import airflow_provider_doc2x
from tests.helpers import REPO

#: The package under test: the checkout's, or the installed wheel's when ``.ci/run`` tests the wheel.
PACKAGE = Path(airflow_provider_doc2x.__file__).resolve().parent


def floors() -> dict[str, int]:
    """CONTRIBUTING.md's map: module -> floor."""
    section = (REPO / "CONTRIBUTING.md").read_text().split("## Architecture", 1)[1]
    block = section.split("```", 2)[1]
    return {name: int(floor) for floor, name in re.findall(r"^floor +(\d+)\s+([\w.]+)", block, re.MULTILINE)}


def is_only_a_docstring(path: Path) -> bool:
    """A subpackage's ``__init__`` that says what the subpackage is for and imports nothing is no module of the map."""
    body = ast.parse(path.read_text()).body
    return all(
        (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
        or (isinstance(node, ast.ImportFrom) and node.module == "__future__")
        for node in body
    )


def modules() -> dict[str, Path]:
    """Each module of the package by its dotted name inside it; a package by its own name."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            if is_only_a_docstring(path):
                continue
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


def imported(node: ast.ImportFrom | ast.Import, importer: str, known: set[str]) -> set[str]:
    """The package's modules one import statement names (``from pkg.pdf_lane import lane`` names ``pdf_lane.lane``)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
        return {
            name.removeprefix("airflow_provider_doc2x.")
            for name in targets
            if name.startswith("airflow_provider_doc2x.")
        }
    if node.level:
        base = importer.split(".")[: -node.level] if importer in known else []
        module = ".".join([*base, *(node.module or "").split(".")]).strip(".")
    elif node.module == "airflow_provider_doc2x":
        module = ""
    elif (node.module or "").startswith("airflow_provider_doc2x."):
        module = node.module.removeprefix("airflow_provider_doc2x.")
    else:
        return set()
    names = set()
    for alias in node.names:
        submodule = f"{module}.{alias.name}".strip(".")
        if submodule in known:
            names.add(submodule)
        elif module:
            names.add(module)
    return names


def imports() -> dict[str, set[str]]:
    """Each module of the package -> the modules of the package it imports (at module level or inside functions)."""
    known = modules()
    found: dict[str, set[str]] = {}
    for name, path in known.items():
        found[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                found[name] |= imported(node, name, set(known))
        found[name].discard(name)
    return found


def test_every_module_is_on_the_map():
    assert set(modules()) == set(floors())


def test_no_module_imports_from_its_own_floor_or_above():
    floor = floors()
    upward = [
        f"{importer} (floor {floor[importer]}) imports {target} (floor {floor[target]})"
        for importer, targets in imports().items()
        for target in targets
        if floor[target] >= floor[importer]
    ]
    assert upward == []


def test_an_upward_import_inside_a_subpackage_is_caught():
    """Positive control: the reader sees an import between two modules of one subpackage, by either spelling."""
    known = set(modules())
    absolute = ast.parse("from airflow_provider_doc2x.pdf_lane.lane import PdfLane").body[0]
    relative = ast.parse("from . import lane").body[0]
    assert isinstance(absolute, ast.ImportFrom) and isinstance(relative, ast.ImportFrom)
    assert imported(absolute, "pdf_lane.staging", known) == {"pdf_lane.lane"}
    assert imported(relative, "pdf_lane.staging", known) == {"pdf_lane.lane"}


#: A module or a class past these has more than one job: give each its own (CONTRIBUTING.md).
MOST_MODULE_LINES = 600
MOST_CLASS_LINES = 300


def test_no_module_or_class_outgrows_one_job():
    too_long = []
    for name, path in modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MOST_MODULE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if (
                isinstance(node, ast.ClassDef)
                and (size := node.end_lineno - node.lineno + 1) > MOST_CLASS_LINES
            ):
                too_long.append(f"{name}.{node.name}: {size} lines")
    assert too_long == []
