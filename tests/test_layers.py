"""The package's import graph follows the data flow: every module imports only from layers below its own.

Layers, bottom to top (docs/DECISIONS.md, "Layout"): infra -> models -> hf -> data | surgery -> distill -> eval
-> pod -> demo -> commands -> cli. `data` and `surgery` are siblings and never import each other. Imports of the
package sit at module top level, except in the command layer (cli.py, commands/), which imports lazily so that
`boomerang --help` stays fast. The checks read the source with `ast`; nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "boomerang_jax"
LAYERS = {"infra": 0, "models": 1, "hf": 2, "data": 3, "surgery": 3, "distill": 4, "eval": 5, "pod": 6,
          "demo": 7, "commands": 8, "cli": 9}
LAZY_OK = ("cli", "commands")  # where function-local imports of the package are allowed
MAX_LINES = 420


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported boomerang_jax module, line, at module top level) for every import of the package in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "boomerang_jax" or node.module.startswith("boomerang_jax."):
                for a in node.names:  # `from pkg import module` names the module itself
                    sub = f"{node.module}.{a.name}"
                    out.append((sub if sub in MODULES else node.module, node.lineno, id(node) in top))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; the package uses absolute imports")
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top) for a in node.names if a.name.startswith("boomerang_jax.")]
    return out


def _layer(module: str) -> str:
    """The layer of a module: its package under boomerang_jax ('cli' for the top-level cli.py)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_belongs_to_a_layer():
    unknown = sorted(m for m in MODULES if m != "boomerang_jax" and _layer(m) not in LAYERS)
    assert not unknown, f"modules outside the layers {sorted(LAYERS)}: {unknown}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "boomerang_jax"))
def test_module_imports_only_from_lower_layers(module):
    own = _layer(module)
    bad = []
    for target, line, _ in _imports(MODULES[module]):
        other = _layer(target)
        if other == own:
            continue
        if other not in LAYERS:
            bad.append(f"line {line}: {target} (not in any layer)")
        elif LAYERS[other] >= LAYERS[own]:
            bad.append(f"line {line}: {target} ({other} is not below {own})")
    assert not bad, f"{module} imports upward or sideways:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) not in LAZY_OK and m != "boomerang_jax"))
def test_library_modules_import_the_package_at_top_level(module):
    local = [f"line {line}: {target}" for target, line, top in _imports(MODULES[module]) if not top]
    assert not local, f"{module} imports the package inside functions (hides the real graph):\n  " + "\n  ".join(local)


def _resolve(target: str) -> str | None:
    """The module an import names ('boomerang_jax.surgery.LayerPlan' style names resolve to their package)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def test_import_graph_has_no_cycle():
    graph = {m: {r for t, _, top in _imports(p) if top and (r := _resolve(t)) and r != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            # a package's __init__ importing its own submodules is how re-exports work, not a cycle of the flow
            if m.startswith(n + ".") or n.startswith(m + "."):
                continue
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_module_is_over_the_size_limit():
    big = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them by job): {big}"


def test_the_checks_see_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from boomerang_jax.distill import train\n\ndef f():\n    from boomerang_jax.infra import storage\n")
    assert _imports(bad) == [("boomerang_jax.distill.train", 1, True), ("boomerang_jax.infra.storage", 4, False)]
    assert LAYERS[_layer("boomerang_jax.distill.train")] > LAYERS[_layer("boomerang_jax.surgery.plan")]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_use_only_the_public_names_of_other_modules(module):
    tree = ast.parse(MODULES[module].read_text())
    private = [f"line {n.lineno}: {n.module}.{a.name}" for n in ast.walk(tree)
               if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("boomerang_jax")
               for a in n.names if a.name.startswith("_")]
    assert not private, f"{module} imports private names (make them public where they live):\n  " + "\n  ".join(private)
