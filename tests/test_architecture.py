"""The package's structure stays walkable: no import cycles (counting every import, also
those inside functions), no module over 600 lines, and imports only at module level
(optional dependencies load through :mod:`denseclip.optional`)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "denseclip"
MAX_LINES = 600


def modules() -> dict[str, Path]:
    """Dotted module name → file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Package modules that ``name`` imports anywhere in its file. ``from pkg import x``
    counts as importing ``pkg.x`` when that is a module, else ``pkg``; a module's own
    parent packages (imported implicitly anyway) and the top-level package are left out."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                child = f"{target}.{alias.name}"
                found.add(child if child in known else target)
    return {m for m in found if m in known and m != name and m != "denseclip"
            and not name.startswith(m + ".")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path of module names, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    known = modules()
    assert "denseclip.models.guidance" in known and "denseclip.weights.checkpoint" in known
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert "denseclip.models.guidance" in graph["denseclip.models.segmentor"]
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))


def test_the_weights_package_imports_no_model_code():
    """denseclip.weights (checkpoints, downloads, save_pretrained) sits below the models:
    they import it, so it imports neither them nor the tasks that build them, even
    indirectly."""
    known = modules()
    graph = {name: imported(name, path, known) for name, path in known.items()}
    weights = [m for m in known if m == "denseclip.weights" or m.startswith("denseclip.weights.")]
    assert "denseclip.weights.resolver" in weights
    reached, todo = set(), list(weights)
    while todo:
        for dep in graph[todo.pop()] - reached:
            reached.add(dep)
            todo.append(dep)
    model_code = sorted(m for m in reached
                        if m.startswith(("denseclip.models", "denseclip.tasks")))
    assert not model_code, f"denseclip.weights reaches model code: {model_code}"


def test_no_module_is_too_long():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in modules().values()
            if (n := p.read_text(encoding="utf-8").count("\n")) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_imports_are_at_module_level():
    inside = []
    for path in modules().values():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inside += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
                           for node in ast.walk(func)
                           if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert not inside, f"imports inside functions: {inside}"


def subpackage_graph(known: dict[str, Path]) -> dict[str, set[str]]:
    """Sub-package → the sub-packages its modules import (root modules left out)."""
    subs = {name.split(".")[1] for name, path in known.items()
            if name.count(".") >= 1 and (PACKAGE / name.split(".")[1]).is_dir()}
    graph: dict[str, set[str]] = {s: set() for s in subs}
    for name, path in known.items():
        here = name.split(".")[1] if name.count(".") >= 1 else None
        for dep in imported(name, path, known):
            there = dep.split(".")[1] if dep.count(".") >= 1 else None
            if here in subs and there in subs and here != there:
                graph[here].add(there)
    return graph


def test_no_cycle_between_sub_packages():
    """Layers, not just modules: models never reach up into tasks, evaluation never into
    engine, and so on (a cycle of packages can hide behind acyclic modules)."""
    graph = subpackage_graph(modules())
    assert {"models", "tasks", "engine", "evaluation", "weights", "tools", "cli"} <= set(graph)
    assert "models" in graph["tasks"] and "tasks" in graph["engine"]
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))


TASK_NAMES = {"segmentation", "retinanet", "mask_rcnn", "detection"}


def _string_constants(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_string_constants(e) for e in node.elts))
    return set()


def task_name_comparisons(source: str) -> list[int]:
    """Lines of ``source`` that compare something with a task name (``==``, ``in``,
    ``match``): what differs between tasks belongs to their objects in denseclip.tasks."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(
                _string_constants(x) & TASK_NAMES for x in [node.left, *node.comparators]):
            lines.append(node.lineno)
        if isinstance(node, ast.match_case) and _string_constants(
                getattr(node.pattern, "value", None) or ast.Constant(None)) & TASK_NAMES:
            lines.append(node.pattern.lineno)
    return lines


def test_task_names_are_compared_only_in_the_task_package():
    assert task_name_comparisons("if cfg.model.task != 'segmentation':\n    pass") == [1]
    assert task_name_comparisons("x = task in ('retinanet', 'mask_rcnn')") == [1]
    found = {f"{path.relative_to(PACKAGE.parent)}:{line}"
             for name, path in modules().items() if not name.startswith("denseclip.tasks")
             for line in task_name_comparisons(path.read_text(encoding="utf-8"))}
    assert not found, f"task-name comparisons outside denseclip.tasks: {sorted(found)}"


def test_the_package_root_holds_only_foundations():
    root = sorted(p.name for p in PACKAGE.glob("*.py")
                  if p.name not in ("__init__.py", "__main__.py"))
    assert len(root) <= 8, root
    assert {"config.py", "classes.py", "runtime.py", "utils.py", "optional.py"} <= set(root)


# Modules that import by name at run time (not with an import statement), and why:
# denseclip.optional loads optional dependencies, and (lazy_exports) the torch-backed names
# of the packages denseclip and denseclip.weights on first use (PEP 562 __getattr__); the
# command line loads a command's module only when that command runs (cli.load_run).
DEFERRED_IMPORTERS = {"denseclip", "denseclip.weights", "denseclip.optional", "denseclip.cli"}


def _import_module_calls(tree: ast.AST) -> list[int]:
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"]


def test_only_the_known_places_import_by_name():
    assert _import_module_calls(ast.parse("importlib.import_module('x')")) == [1]
    found = {name for name, path in modules().items()
             if _import_module_calls(ast.parse(path.read_text(encoding="utf-8")))
             or "__import__" in path.read_text(encoding="utf-8")}
    assert found <= DEFERRED_IMPORTERS, sorted(found - DEFERRED_IMPORTERS)


def test_the_lazy_names_and_commands_point_at_real_code():
    """What the deferred imports name exists: the packages' lazy names, and every
    command's ``module:function``, a module of denseclip.cli (so the layering above, which
    sees only import statements, still holds for them)."""
    import importlib

    import denseclip
    import denseclip.weights
    from denseclip.cli import COMMANDS, load_run

    for package in (denseclip, denseclip.weights):
        for name, module in package._LAZY.items():
            assert hasattr(importlib.import_module(module, package.__name__), name)
        assert set(package._LAZY) <= set(package.__all__)
    known = modules()
    for command in COMMANDS:
        assert f"denseclip.cli.{command.run.partition(':')[0]}" in known
        assert callable(load_run(command))
