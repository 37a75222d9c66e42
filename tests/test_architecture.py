"""The package's layering, checked on its import graph (issue 14).

The layers are the import-linter contract in ``pyproject.toml`` (``[tool.importlinter]``); this test reads
that same list and checks it with its own AST walk, which counts imports placed inside functions too. It
needs neither import-linter nor an import of the package, so it runs everywhere; ``.ci/run`` also runs
``lint-imports`` on the same contract.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PKG_DIR = ROOT / "python" / "neuroadda_rt"
PKG = "neuroadda_rt"
COMPILED = {f"{PKG}._core"}  # the pybind11 module: a leaf below everything


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG_DIR.rglob("*.py"):
        parts = list(p.relative_to(PKG_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every package-internal module that ``name`` imports, at any depth of its code."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith(PKG):
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule itself
                sub = f"{target}.{alias.name}"
                if sub in MODULES or sub in COMPILED:
                    out.add(sub)
                elif target in MODULES:
                    out.add(target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PKG) and alias.name in MODULES:
                    out.add(alias.name)
    out.discard(name)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _contract() -> dict:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    contracts = cfg["tool"]["importlinter"]["contracts"]
    return next(c for c in contracts if c["type"] == "layers")


def _layer_index() -> list[tuple[int, str, bool]]:
    """(layer position, module prefix, independent-siblings) for every entry of the contract."""
    out = []
    for i, layer in enumerate(_contract()["layers"]):
        independent = "|" in layer
        for part in re.split(r"[|:]", layer):
            out.append((i, f"{PKG}.{part.strip()}", independent))
    return out


def _layer_of(module: str, index) -> tuple[int, str, bool] | None:
    best = None
    for entry in index:
        prefix = entry[1]
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[1]):
                best = entry
    return best


def test_the_graph_sees_imports_inside_functions():
    # Every package-internal import placed inside a function must be an edge of the graph, or the layer and
    # cycle checks below would miss exactly the imports the old layout hid there.
    checked = 0
    for name, path in MODULES.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                    target = f"{package}.{node.module}"
                    if target in MODULES:
                        assert target in GRAPH[name], f"{name}: function-level import of {target} not in the graph"
                        checked += 1
    assert checked > 0, "no function-level import found to check the walk with"


def test_no_import_cycles():
    # Tarjan's strongly connected components over module -> imported module.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles (imports inside functions included): {cycles}"


def test_every_module_is_in_a_layer():
    index = _layer_index()
    unplaced = sorted(m for m in MODULES if m != PKG and _layer_of(m, index) is None)
    assert not unplaced, f"modules missing from the layers contract in pyproject.toml: {unplaced}"


def test_lower_layers_never_import_higher_ones():
    index = _layer_index()
    bad = []
    for src, targets in GRAPH.items():
        a = _layer_of(src, index)
        if a is None:
            continue
        for dst in targets:
            b = _layer_of(dst, index)
            if b is None:
                continue
            if b[0] < a[0]:
                bad.append(f"{src} -> {dst}")
            elif b[0] == a[0] and a[1] != b[1] and a[2]:
                bad.append(f"{src} -> {dst} (independent siblings)")
    assert not bad, "layer violations (imports inside functions included):\n" + "\n".join(sorted(bad))


def test_the_core_never_imports_the_research_harness():
    index = _layer_index()
    study = _layer_of(f"{PKG}.study", index)
    assert study is not None
    for src, targets in GRAPH.items():
        layer = _layer_of(src, index)
        if layer is not None and layer[0] > study[0]:
            assert not any(t == f"{PKG}.study" or t.startswith(f"{PKG}.study.") for t in targets), src


GUI = ("napari", "npe2", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "vispy", "superqt")


def test_only_the_napari_plugin_imports_napari_or_qt():
    # The napari plugin (neuroadda_rt.napari, an optional extra) is the one place napari and Qt may be imported:
    # its own layer keeps the package's modules from importing the plugin, and this keeps them from importing
    # napari or a Qt binding directly (imports inside functions included).
    plugin = f"{PKG}.napari"
    bad, seen = [], 0
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                roots = [node.module.split(".")[0]]
            else:
                continue
            for r in roots:
                if r in GUI:
                    if name == plugin or name.startswith(plugin + "."):
                        seen += 1
                    else:
                        bad.append(f"{name} imports {r}")
    assert not bad, "napari/Qt imported outside the plugin: " + "; ".join(bad)
    assert seen > 0, "the walk found no GUI import in the plugin itself (it could not fail)"


GUESSING = [
    # a name in an error message is fine; deciding by a type's name is not
    (re.compile(r"(type\([^()]*\)|__class__)\.__name__\s*(==|!=|\bin\b|\bnot in\b)"),
     "type(x).__name__ checks: use isinstance on the real type"),
    (re.compile(r"\binspect\.signature\("), "signature probing of the package's own functions"),
    (re.compile(r"getattr\([^()]*,\s*['\"]\w+['\"],\s*getattr\("), "getattr(x, 'a', getattr(x, 'b')) chains"),
]


@pytest.mark.parametrize(("pattern", "why"), GUESSING, ids=["typename", "signature", "getattr-chain"])
def test_no_guessing_at_our_own_types(pattern, why):
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in PKG_DIR.rglob("*.py")
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not hits, f"{why}: {hits}"


def test_the_compiled_module_stub_matches_the_build():
    core = pytest.importorskip("neuroadda_rt._core")
    tree = ast.parse((PKG_DIR / "_core.pyi").read_text(encoding="utf-8"))
    stubbed = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    stubbed |= {t.id for n in tree.body if isinstance(n, ast.AnnAssign) for t in [n.target]}
    built = {n for n in dir(core) if not (n.startswith("__") and n.endswith("__"))} | {"__version__"}
    assert stubbed == built, f"only in the stub: {sorted(stubbed - built)}; only in the build: {sorted(built - stubbed)}"
    table = core.ContingencyTable
    methods = {n.name for c in tree.body if isinstance(c, ast.ClassDef) for n in c.body if isinstance(n, ast.FunctionDef)}
    assert {m for m in dir(table) if not m.startswith("_")} <= methods
