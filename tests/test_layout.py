"""The layout: the README's map of modules is the tree, no module imports one that imports it
back (directly or around a loop), and every module says what it exports in `__all__`: the
names other modules and tests read from it."""

import ast
import importlib
import inspect
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "poolmgr"
README = (ROOT / "README.md").read_text()


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def absolute(node: ast.ImportFrom, package: str) -> str:
    """The module a `from ... import` reads from, relative levels resolved."""
    base = node.module or ""
    if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
    return base


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """poolmgr modules `name` imports anywhere in its file (lazy imports count too)."""
    package = package_of(name, path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = absolute(node, package)
            found |= {f"{base}.{alias.name}" for alias in node.names} | {base}
    return {m for m in found if m in known and m != name}


def reads(path: Path, package: str, known: set[str]) -> set[tuple[str, str, int]]:
    """(module, name, line) for each name the file reads from a poolmgr module: `from m import
    name`, and `m.name` where `m` is a poolmgr module the file imports and never rebinds."""
    tree = ast.parse(path.read_text())
    aliases: dict[str, str] = {}  # local name -> module
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = absolute(node, package)
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
                elif base in known:
                    found.add((base, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    local = alias.asname or alias.name.partition(".")[0]
                    aliases[local] = alias.name if alias.asname else local
    rebound = ({node.id for node in ast.walk(tree)
                if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
               | {node.arg for node in ast.walk(tree) if isinstance(node, ast.arg)})
    for node in ast.walk(tree):
        chain = []
        while isinstance(node, ast.Attribute):
            chain.insert(0, (node.attr, node.lineno))
            node = node.value
        if not isinstance(node, ast.Name) or node.id not in aliases or node.id in rebound:
            continue
        module = aliases[node.id]
        for attr, line in chain:
            if f"{module}.{attr}" not in known:
                found.add((module, attr, line))
                break
            module = f"{module}.{attr}"
    return found


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
    end = section.find("\n\n", section.index("|---|"))  # the table may end the README
    section = section if end < 0 else section[:end]
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


def declares_all(path: Path) -> bool:
    for node in ast.parse(path.read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(target, ast.Name) and target.id == "__all__" for target in targets):
            return True
    return False


def test_every_module_declares_all():
    assert [name for name, path in sorted(modules().items()) if not declares_all(path)] == []


def test_no_module_keeps_a_hand_written_exports_list():
    """`__all__` is the one list of a module's public names (hand-written lists went stale)."""
    assert [name for name, path in sorted(modules().items())
            if re.search(r"^Exports:", ast.get_docstring(ast.parse(path.read_text())) or "",
                         re.M)] == []


def test_every_name_in_all_exists():
    missing = []
    for name in sorted(modules()):
        if name.endswith("__main__"):  # running it runs the command line; it exports nothing
            continue
        module = importlib.import_module(name)
        missing += [f"{name}.{export}" for export in getattr(module, "__all__", [])
                    if not hasattr(module, export)]
    assert missing == []


def test_names_read_across_modules_are_exported():
    """A name another poolmgr module or a test reads from a module is in that module's
    `__all__`, unless it starts with "_" (a test reaching in, on purpose) or is a module the
    exporter imports (a test patching `load.asyncio`)."""
    mods = modules()
    readers = {name: (path, package_of(name, path)) for name, path in mods.items()}
    readers |= {f"tests.{path.stem}": (path, "tests") for path in (ROOT / "tests").rglob("*.py")}
    unexported = []
    for reader, (path, package) in sorted(readers.items()):
        for module_name, name, line in sorted(reads(path, package, set(mods))):
            if module_name == reader or name.startswith("_"):
                continue
            module = importlib.import_module(module_name)
            exported = getattr(module, "__all__", [])
            if name not in exported and not inspect.ismodule(getattr(module, name, None)):
                unexported.append(f"{path.relative_to(ROOT)}:{line}: {module_name}.{name}")
    assert unexported == [], "read from another module but not in its __all__"


def test_the_master_is_the_arbiter_only():
    """master.py keeps the loop, signals, spawn, reap, murder, manage, reload and stop, in at
    most 400 lines; policy, status, the control verbs and the workers' file layout live in
    their own modules."""
    path = PACKAGE / "master.py"
    assert len(path.read_text().splitlines()) <= 400
    known = set(modules())
    assert imports("poolmgr.master", path, known) & {
        "poolmgr.autoscale", "poolmgr.maildir", "poolmgr.scanner.quarantine", "poolmgr.metrics",
        "poolmgr.cluster", "poolmgr.notify", "poolmgr.pidfile", "poolmgr.upgrade"} == set()
