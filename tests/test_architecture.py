"""The house drawn from the imports: each stage is one package, and arrows point only down.

Floors, from the ground up: the user-facing errors, the vocabularies (registry), the
settings schema (config), files and tables (io), the data half and the shared model layer
(prepare, models: side by side, neither imports the other), training and apply (side by
side: apply edits photos with prepare's faces and models' pipeline), evaluation, release,
and the workflow (the CLI and the Snakemake glue) on top. A module may import its own
package and the floors below.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "facelora"

FLOORS = {
    "errors": 0,
    "registry": 1,
    "config": 2,
    "io": 3,
    "prepare": 4,
    "models": 4,
    "train": 5,
    "apply": 5,  # beside train: prepare + models for photos; only workflow imports it
    "evaluate": 6,
    "release": 7,
    "workflow": 8,
}
TOP = {"__init__", "__main__"}  # the package's own entry points


def room(module: str) -> str | None:
    """The stage package (or top-level module) a dotted facelora module lives in."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "facelora" else None


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("facelora.")}


def house() -> dict[str, set[str]]:
    """{room: rooms it imports} over every module of the package."""
    arrows: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        here = rel.parts[0].removesuffix(".py")
        if here in TOP:
            continue
        targets = {room(m) for m in imports_of(path)} - {None, here}
        arrows.setdefault(here, set()).update(t for t in targets if t in FLOORS)
    return arrows


def test_every_room_has_a_floor():
    rooms = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    assert rooms - TOP - {"py.typed"} == set(FLOORS), "give a new package its floor here"


def upward(arrows: dict[str, set[str]]) -> list[str]:
    return [
        f"{here} (floor {FLOORS[here]}) imports {there} (floor {FLOORS[there]})"
        for here, targets in sorted(arrows.items())
        for there in sorted(targets)
        if FLOORS[there] >= FLOORS[here]
    ]


def test_arrows_point_only_down():
    assert not upward(house()), "\n".join(upward(house()))


def test_the_check_sees_upward_and_sideways_arrows(tmp_path):
    """The check itself can fail: models importing train, or prepare importing models."""
    bad = tmp_path / "bad.py"
    bad.write_text("from facelora.train.loop import Trainer\nimport facelora.io.atomic\n")
    assert {room(m) for m in imports_of(bad)} == {"train", "io"}
    found = upward({"models": {"train", "io"}, "prepare": {"models"}, "train": {"models"}})
    assert found == [
        "models (floor 4) imports train (floor 5)",
        "prepare (floor 4) imports models (floor 4)",
    ]
