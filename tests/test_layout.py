"""The layout: the README's map of modules is the tree, and no module imports one that
imports it back (directly or around a loop)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "poolmgr"
README = (ROOT / "README.md").read_text()


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """poolmgr modules `name` imports anywhere in its file (lazy imports count too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{alias.name}" for alias in node.names} | {base}
    return {m for m in found if m in known and m != name}


def test_no_import_cycles():
    mods = modules()
    graph = {name: imports(name, path, set(mods)) - {"poolmgr"} for name, path in mods.items()}
    cycles = []

    def visit(name, trail):
        for dep in sorted(graph[name]):
            if dep in trail:
                cycles.append(trail[trail.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, trail + [dep])
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    assert cycles == []


def test_readme_map_names_every_module_and_nothing_else():
    section = README[README.index("## Architecture"):]
    section = section[:section.index("\n\n", section.index("|---|"))]
    rows = {m[0]: m[1] for m in re.findall(r"^\| `(poolmgr/[\w/.]+)` \| (.*) \|$", section,
                                            re.M)}
    listed = set()
    for path, text in rows.items():
        if path.endswith("/"):
            listed |= {path + name for name in re.findall(r"`(\w+\.py)`", text)}
        else:
            listed.add(path)
    tree = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
            if p.name not in ("__init__.py", "__main__.py")}
    assert sorted(tree - listed) == [], "modules missing from the README's map"
    assert sorted(listed - tree) == [], "the README's map names modules that do not exist"
