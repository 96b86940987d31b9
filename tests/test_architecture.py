"""The rooms and arrows of STYLE.md: imports only point down the layer list."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fusedisk"

# Lower layers first. A module may import only from layers before its own;
# fs (the FUSE edge) and control (the control edge) never import each other.
LAYERS: list[set[str]] = [
    {"errors", "sizes", "failpoint", "fuseshim", "mountinfo", "gcwatch", "trace"},
    {"tlspsk", "agent"},
    {"remote"},
    {"nbdfile"},
    {"bitmap", "metadata", "config", "gate"},
    {"backing", "api"},
    {"cbt", "progress", "lifecycle"},
    {"vdisk"},
    {"datastore"},
    {"mirror"},
    {"staging"},
    {"switchover"},
    {"relocation", "snapshots", "pagecache"},
    {"snapview"},
    {"fs", "control", "fuseloop", "extraops"},
    {"commands", "nbd", "storeview", "storeviews"},
    {"daemon"},
    {"service", "demo", "export"},
    {"cli"},
]


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fusedisk."):
            found.add(node.module.split(".")[1])  # type: ignore[union-attr]
    return found


def test_every_module_has_a_layer() -> None:
    known = set().union(*LAYERS) | {"__init__", "__main__"}
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules <= known, f"place {sorted(modules - known)} in LAYERS"


def test_imports_point_down() -> None:
    level = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    wrong = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem not in level:
            continue
        for target in _imports(path) - {"__init__"}:
            if target in level and level[target] >= level[path.stem] and target != path.stem:
                wrong.append(f"{path.stem} imports {target}")
    assert not wrong, wrong
