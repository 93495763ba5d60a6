"""The package is a building whose imports only point down (issue #21; docs/architecture.md).

Read from the source (every import: module level, inside functions, under TYPE_CHECKING):

- each subpackage sits on one layer, and no module imports a module on a higher layer;
- no import circle between modules;
- at most 8 top-level modules in hyperinf_ext/, none over 400 lines;
- no private name (``_x``) imported from another subpackage.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "hyperinf_ext"

# bottom → top; a module may import from its own layer and the ones below
LAYERS = [
    {"errors", "version", "_C"},
    {"kernels", "backends"},
    {"ops"},
    {"solvers"},
    {"curvature"},
    {"capture"},
    {"persistence"},
    {"distributed"},
    {"attributor"},
    {"index"},
    {"integrations"},
    {"app"},
    {"", "__main__"},  # the package's __init__ (the public API) and `python -m hyperinf_ext`
]
MAX_TOP_LEVEL_MODULES = 8
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    for p in (ROOT / "kernels").glob("*.py"):
        mods["kernels." + p.stem] = p
    return mods


MODULES = _modules()


def _layer(mod: str) -> int:
    head = mod.split(".", 1)[0]
    for i, names in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"hyperinf_ext.{mod}: no layer for {head!r} (add it to LAYERS and docs/architecture.md)")


def _subpackage(mod: str) -> str:
    parts = mod.split(".")
    return ".".join(parts[:2]) if parts[0] == "app" and len(parts) > 2 else parts[0]


def _imports(mod: str, path: Path):
    """(imported module, imported names) of every import in ``path``, as modules of the package."""
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    base = mod.split(".") if mod else []
    if not is_pkg:
        base = base[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base[: len(base) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif node.module and (node.module == "hyperinf_ext" or node.module.startswith("hyperinf_ext.")):
                parts = node.module.split(".")[1:]
            else:
                continue
            target = ".".join(parts)
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                if sub in MODULES or alias.name == "_C":
                    yield sub, None, node.lineno
                else:
                    yield target, alias.name, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("hyperinf_ext."):
                    yield alias.name.split(".", 1)[1], None, node.lineno


def _edges():
    for mod, path in MODULES.items():
        for target, name, line in _imports(mod, path):
            yield mod, target, name, f"{path.relative_to(ROOT)}:{line}"


def test_imports_point_down():
    up = [f"{where}: hyperinf_ext.{mod or '__init__'} (layer {_layer(mod)}) imports hyperinf_ext.{tgt} "
          f"(layer {_layer(tgt)})"
          for mod, tgt, _, where in _edges() if _layer(tgt) > _layer(mod)]
    assert not up, "imports that point up:\n" + "\n".join(up)


def test_no_import_circle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, tgt, _, _ in _edges():
        if tgt in graph and tgt != mod:
            graph[mod].add(tgt)
    # Tarjan's strongly connected components, iteratively
    index, low, on, stack, sccs, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not sccs, "import circles:\n" + "\n".join(" ↔ ".join(c) for c in sccs)


def test_top_level_modules_and_module_sizes():
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    big = [f"{p.relative_to(ROOT)}: {n} lines" for p in PKG.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not big, big


def test_no_private_name_crosses_a_subpackage():
    bad = [f"{where}: {name} from hyperinf_ext.{tgt}" for mod, tgt, name, where in _edges()
           if name and name.startswith("_") and not name.startswith("__")
           and _subpackage(tgt) != _subpackage(mod)]
    assert not bad, "private names imported from another subpackage:\n" + "\n".join(bad)


def test_the_check_sees_a_violation(tmp_path):
    # the layer table orders the layers as docs/architecture.md draws them
    assert _layer("ops.checks") < _layer("solvers.auto") < _layer("curvature.damping") < _layer("attributor.fitting")
    assert _layer("attributor.hyperinf") < _layer("app.cli")
    src = tmp_path / ("m" + ".py")
    src.write_text("from ..app.cli import main\nfrom ..solvers.auto import _private\n")
    found = list(_imports("ops.m", src))
    assert ("app.cli", "main", 1) in found and ("solvers.auto", "_private", 2) in found
