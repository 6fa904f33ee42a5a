"""Imports point one way (docs/architecture.md, "Layout"): each folder imports only the folders below it, and the two
halves of simulate/ never import each other. Read from the source (every import statement, also inside functions)."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {  # folder → its import name
    "reference": "trinity.reference", "accel": "trinity.accel", "distributed": "trinity.distributed",
    "run": "trinity.run", "simulate/virtual": "trinity.simulate.virtual",
    "simulate/planning": "trinity.simulate.planning", "cli": "trinity.cli",
}
MAY_NOT_IMPORT = {
    "reference": ["trinity.accel", "trinity.distributed", "trinity.run", "trinity.simulate", "trinity.cli"],
    "accel": ["trinity.distributed", "trinity.run", "trinity.simulate", "trinity.cli"],
    "distributed": ["trinity.run", "trinity.simulate", "trinity.cli"],
    "run": ["trinity.simulate", "trinity.cli"],
    "simulate/virtual": ["trinity.simulate.planning", "trinity.cli"],
    "simulate/planning": ["trinity.simulate.virtual", "trinity.cli"],
}


def _imports(path: str, package: str) -> set[str]:
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
    return found


@pytest.mark.parametrize("folder", sorted(MAY_NOT_IMPORT))
def test_a_folder_imports_only_the_folders_below_it(folder):
    package = PACKAGES[folder]
    bad = []
    for directory, _, files in os.walk(os.path.join(ROOT, folder)):
        sub = os.path.relpath(directory, os.path.join(ROOT, folder))
        pkg = package if sub == "." else package + "." + sub.replace(os.sep, ".")
        for name in files:
            if name.endswith(".py"):
                for imported in _imports(os.path.join(directory, name), pkg):
                    if any(imported == f or imported.startswith(f + ".") for f in MAY_NOT_IMPORT[folder]):
                        bad.append(f"{os.path.join(directory, name)} imports {imported}")
    assert not bad, bad
