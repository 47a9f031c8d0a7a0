"""The method description's map of the code (docs/METHOD.md, section 6) names modules and functions that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _defined(path: Path) -> set[str]:
    """Top-level names and `Class.method` names defined in a module."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names |= {f"{node.name}.{n.name}" for n in node.body if isinstance(n, ast.FunctionDef)}
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def test_every_module_and_name_in_the_method_code_map_exists():
    text = (REPO / "docs" / "METHOD.md").read_text()
    rows = [line for line in text[text.index("## 6. Where each step lives"):].splitlines()
            if line.startswith("| ") and "`" in line and not line.startswith("| step |")]
    assert len(rows) > 15
    missing = []
    for row in rows:
        cell = row.split("|")[2]
        # "`a/b.py`: `f`, `g`; `c.py`: `h` (`x`, `y`)" -> module -> names
        for part in cell.split(";"):
            m = re.match(r"\s*`([\w/]+\.py)`:\s*(.*)", part)
            assert m, f"cannot read {part!r} in: {row}"
            path = REPO / "boomerang_jax" / m.group(1)
            if not path.exists():
                missing.append(f"{m.group(1)} (no such module)")
                continue
            defined = _defined(path)
            for name in re.findall(r"`([\w.]+)`", m.group(2)):
                qualified = name if "." in name or name in defined else None
                if name not in defined and not (qualified and qualified in defined):
                    # `from_knobs` inside "LayerPlan (`from_knobs`, ...)" is a method of the class before it
                    owner = re.match(r"\s*`(\w+)`\s*\(", m.group(2))
                    if not (owner and f"{owner.group(1)}.{name}" in defined):
                        missing.append(f"{m.group(1)}: {name}")
    assert not missing, f"docs/METHOD.md names what the code does not have: {missing}"
