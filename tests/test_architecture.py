"""The package's import structure: onnxopt's modules (and the passes, installed as
``onnxopt.passes``) form an acyclic import graph, imports inside functions are kept for the
optional dependencies only, and the torch half does not reach the pass manager.

The graph is read from the source with ``ast`` (no module is imported), function-level imports
included: an import that a function hides is still an edge of the design."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# optional dependencies a function may import when it needs them: importing them at module
# level would make onnxopt unusable without them
OPTIONAL = ("torch", "tensorrt", "matplotlib")
# onnxopt's own modules that import torch at module level: importing them is importing torch
TORCH_PART = "onnxopt.torch"


def _modules() -> dict:
    """{dotted module name: path} of onnxopt/ and passes/ (as onnxopt.passes)."""
    mods = {}
    for folder, prefix in ((ROOT / "onnxopt", ("onnxopt",)), (ROOT / "passes", ("onnxopt", "passes"))):
        for path in folder.rglob("*.py"):
            parts = prefix + path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _imported(module: str, node: ast.AST, is_package: bool, mods: dict) -> list:
    """The modules an import statement names: ``from pkg import name`` is an edge to
    ``pkg.name`` when that is a module, else to ``pkg``."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        pkg = ".".join(base + ([node.module] if node.module else []))
    else:
        pkg = node.module
    return [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in mods else pkg for a in node.names]


def _imports() -> tuple:
    """(edges {module: set of onnxopt modules it imports}, [(module, imported, line)] of the
    imports made inside functions)."""
    mods = _modules()
    edges, in_functions = {m: set() for m in mods}, []
    for module, path in mods.items():
        is_package = path.name == "__init__.py"

        def visit(node, in_function):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in _imported(module, child, is_package, mods):
                        if target in mods and target != module:
                            edges[module].add(target)
                        if in_function:
                            in_functions.append((module, target, child.lineno))
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        visit(ast.parse(path.read_text()), False)
    return edges, in_functions


def _cycle(edges: dict):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def _reachable(edges: dict, start: str) -> set:
    seen, todo = set(), [start]
    while todo:
        for n in edges.get(todo.pop(), ()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def test_import_graph_is_acyclic():
    edges, _ = _imports()
    assert len(edges) > 40 and edges["onnxopt.quant.recovery"]  # the scan found the package
    assert _cycle(edges) is None, " -> ".join(_cycle(edges))


def test_function_level_imports_are_only_for_optional_dependencies():
    _, in_functions = _imports()
    bad = [f"{m}:{line} imports {t}" for m, t, line in in_functions
           if t.split(".")[0] not in OPTIONAL and not (t == TORCH_PART or t.startswith(TORCH_PART + "."))]
    assert not bad, "\n".join(bad)


def test_cycle_finder_sees_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_torch_part_does_not_reach_the_pass_manager():
    edges, _ = _imports()
    torch_modules = [m for m in edges if m == TORCH_PART or m.startswith(TORCH_PART + ".")]
    assert torch_modules
    for m in torch_modules:
        reached = _reachable(edges, m)
        assert "onnxopt.manager" not in reached and "onnxopt.registry" not in reached, m


def test_quant_view_is_a_leaf_of_the_quant_package():
    edges, _ = _imports()
    assert not [m for m in edges["onnxopt.quant.view"] if m.startswith("onnxopt.quant")]


def test_no_pass_imports_another_pass():
    """What two passes share lives in the library (onnxopt.ir and the like), not in a pass."""
    edges, _ = _imports()
    passes = [m for m in edges if m.startswith("onnxopt.passes.")]
    assert passes
    def pass_of(m):  # a pass is a module of passes/ or a package there (prune and its channel analysis)
        return m.split(".")[2] if m.startswith("onnxopt.passes.") else None

    bad = [f"{m} imports {t}" for m in passes for t in edges[m] if pass_of(t) and pass_of(t) != pass_of(m)]
    assert not bad, "\n".join(bad)


def test_no_private_name_crosses_modules():
    """``from x import _name`` or ``x._name`` (``x`` one of onnxopt's modules) between onnxopt's
    modules: a private helper used elsewhere is a shared helper and gets a public name."""
    mods = _modules()
    bad = []
    for module, path in mods.items():
        tree = ast.parse(path.read_text())
        imported = set()   # names bound to onnxopt modules here (``from . import x``, ``import onnxopt.x as x``)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("onnxopt")):
                bad += [f"{module} imports {a.name} from {node.module or '.'}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
                imported |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("onnxopt")}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{module} uses {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_rule_families_stay_small():
    """One file per rule family, each readable on its own (about 400 lines at most)."""
    files = sorted((ROOT / "onnxopt" / "rewrite").glob("*.py"))
    assert len(files) >= 7
    long = [f"{p.name}: {len(p.read_text().splitlines())} lines" for p in files if len(p.read_text().splitlines()) > 400]
    assert not long, long
