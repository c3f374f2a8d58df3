"""The import graph of `finegrain`: no cycles, and the layers point one way.

Every module of `src/finegrain` is parsed with `ast`; every `import` and `from ... import`
statement counts, at the top of a module or inside a function (a function-level import hides an
edge from a reader, not from Python). An edge goes to the most specific module named:
`from finegrain.data import pipeline` is an edge to `finegrain.data.pipeline`, `from
finegrain.data import Example` one to `finegrain.data`. A package's own `__init__` is not counted
as imported by its submodules' imports (Python runs it first, but it does not depend on them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import finegrain

PACKAGE = Path(finegrain.__file__).parent

# Cycles still in the graph, each to be removed (then deleted here): the test fails when the
# cycles found differ from this list in either direction, so a new cycle cannot slip in and a
# removed one must be crossed off.
ALLOWED_CYCLES: set[frozenset[str]] = set()

# The layer rule for the data modules: `finegrain.data` reads files and splits examples; it sits
# below `finegrain.datasets` (bundled sets are readers of files in installed packages, built on
# `data`), the tasks, training, evaluation, serving and the model, and imports none of them. A
# task passes the bundled-dataset loader down (`load_splits(..., datasets_module=datasets)`).
# `finegrain.tags` (tag schemes) is neutral: data, tasks and evaluation share it, it imports nothing.
ALLOWED_BELOW = {
    "finegrain.data": ("finegrain.data", "finegrain.config", "finegrain.errors", "finegrain.atomic", "finegrain.tags"),
    "finegrain.datasets": (
        "finegrain.datasets", "finegrain.data", "finegrain.config", "finegrain.errors", "finegrain.atomic",
        "finegrain.tags",
    ),
    "finegrain.tags": (),
    # The run directory's names and readers: training, `finegrain.load` and the server read them here.
    "finegrain.rundir": ("finegrain.rundir", "finegrain.config", "finegrain.errors"),
}

# Inference sits below training: `finegrain.inference` (the predict path), the tasks and the server
# never import `finegrain.train`, and the server reads run directories through `finegrain.rundir`,
# not `finegrain.run` (which trains). Each layer -> the modules it must not import.
FORBIDDEN_ABOVE = {
    "finegrain.inference": ("finegrain.train",),
    "finegrain.tasks": ("finegrain.train",),
    "finegrain.serve": ("finegrain.train", "finegrain.run"),
    "finegrain.ui": ("finegrain.train", "finegrain.run"),  # the dashboard reads runs through rundir and serves through serve
}


def module_name(path: Path) -> str:
    """`finegrain.data.load` for `.../finegrain/data/load.py`, `finegrain.data` for its `__init__.py`."""
    parts = ["finegrain", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The `finegrain` modules that `path` imports anywhere in its body (top level and functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in known else node.module)
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    """Module -> the `finegrain` modules it imports (itself left out)."""
    paths = modules()
    known = set(paths)
    return {name: imports(path, known) - {name} for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The modules of each import cycle: the strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def path_through(graph: dict[str, set[str]], component: frozenset[str]) -> str:
    """One cycle inside `component`, written `a -> b -> ... -> a`, for the failure message."""
    start = min(component)
    trail, node = [start], start
    while True:
        node = min(target for target in graph[node] if target in component)
        if node in trail:
            return " -> ".join([*trail[trail.index(node) :], node])
        trail.append(node)


def test_finds_a_cycle_hidden_in_a_function(tmp_path, monkeypatch):
    # The checker itself: a function-level import closing a loop is a cycle.
    graph = {
        "finegrain.a": {"finegrain.b"}, "finegrain.b": {"finegrain.c"}, "finegrain.c": {"finegrain.a"},
        "finegrain.d": {"finegrain.a"},
    }
    assert cycles(graph) == {frozenset({"finegrain.a", "finegrain.b", "finegrain.c"})}
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from finegrain.data import pipeline\n    import finegrain.tags\n")
    assert imports(source, {"finegrain.data", "finegrain.data.pipeline", "finegrain.tags"}) == {
        "finegrain.data.pipeline", "finegrain.tags",
    }


def test_no_import_cycles_beyond_the_allowed_list():
    graph = import_graph()
    found = cycles(graph)
    new = [path_through(graph, component) for component in found - ALLOWED_CYCLES]
    gone = [sorted(component) for component in ALLOWED_CYCLES - found]
    assert not new, "import cycles (break them; never hide one in a function):\n" + "\n".join(new)
    assert not gone, f"cycles no longer there; remove them from ALLOWED_CYCLES: {gone}"


def within(module: str, layer: str) -> bool:
    """Whether `module` is `layer` or one of its submodules (`finegrain.run` is not within `finegrain.rundir`)."""
    return module == layer or module.startswith(layer + ".")


def test_data_sits_below_datasets_and_tags_imports_nothing():
    graph = import_graph()
    wrong = []
    for module, targets in sorted(graph.items()):
        for layer, allowed in ALLOWED_BELOW.items():
            if module == layer or module.startswith(layer + "."):
                wrong += [
                    f"{module} imports {target}" for target in sorted(targets)
                    if not any(target == a or target.startswith(a + ".") for a in allowed)
                ]
    assert not wrong, "layer rule broken (see ALLOWED_BELOW):\n" + "\n".join(wrong)


def test_inference_tasks_and_serving_do_not_import_training():
    graph = import_graph()
    wrong = [
        f"{module} imports {target}"
        for module, targets in sorted(graph.items())
        for layer, forbidden in FORBIDDEN_ABOVE.items() if within(module, layer)
        for target in sorted(targets)
        if any(within(target, f) for f in forbidden)
    ]
    assert not wrong, "layer rule broken (see FORBIDDEN_ABOVE):\n" + "\n".join(wrong)
