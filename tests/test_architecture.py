"""The package's shape: arrows point one way (no import circle), imports are at the top of their
module (a function-local import of an e2_jax module hides an arrow), and the core (models,
losses, the config and its resolution, the step) imports no TensorFlow."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "e2_jax"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> tuple[set[str], list[tuple[int, str]]]:
    """(e2_jax modules imported at run time, [(line, text) of function-local e2_jax imports])."""
    tree = ast.parse(path.read_text())
    lines = path.read_text().splitlines()
    found, local = set(), []

    def targets(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names if a.name.startswith("e2_jax")]
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("e2_jax"):
            return [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names]
        return []

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # annotations only: never imported at run time
            names = targets(child)
            if names:
                found.update(names)
                if in_function:
                    local.append((child.lineno, lines[child.lineno - 1].strip()))
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    walk(tree, False)
    return {n for n in found if n in modules}, local


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules)[0] - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph`, or None. A package's own submodules imported by its
    __init__ are not a circle with the package (Python imports the package first)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node], _ = 2, stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_circle():
    graph = _graph()
    # The walk sees real edges:
    assert graph["e2_jax.training.train"] >= {"e2_jax.training.step", "e2_jax.evaluation.evaluate"}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_layers_point_down():
    """Models know no data, training or files; losses know no model; data knows no model;
    evaluation knows nothing of training, inference nothing of evaluation; nothing below the
    entry points imports them."""
    graph = _graph()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    def under(prefix: str) -> list[str]:
        return [m for m in graph if m == prefix or m.startswith(prefix + ".")]

    forbidden = {
        "e2_jax.models": ("e2_jax.data", "e2_jax.training", "e2_jax.evaluation", "e2_jax.losses", "e2_jax.workdir",
                          "e2_jax.checkpoints", "e2_jax.storage"),
        "e2_jax.losses": ("e2_jax.models", "e2_jax.data", "e2_jax.training"),
        "e2_jax.data": ("e2_jax.models", "e2_jax.training", "e2_jax.evaluation", "e2_jax.losses"),
        "e2_jax.evaluation": ("e2_jax.training", "e2_jax.main"),
        # Embedding a split (pipeline.embed_split) is below both inference and evaluation's runner;
        # the evaluation config and its protocols (evaluation.protocols) are below the run's spec.
        "e2_jax.inference": ("e2_jax.evaluation.evaluate", "e2_jax.evaluation.selection", "e2_jax.training",
                             "e2_jax.main"),
        "e2_jax.evaluation.protocols": ("e2_jax.spec", "e2_jax.evaluation.evaluate", "e2_jax.data.pipeline"),
        "e2_jax.training": ("e2_jax.main", "e2_jax.inference", "e2_jax.visualize", "e2_jax.captioning"),
    }
    for layer, banned in forbidden.items():
        for module in under(layer):
            bad = sorted(m for m in reach(module) if m.startswith(banned))
            assert not bad, f"{module} reaches {bad}"


def test_the_circle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_function_local_import_of_an_e2_jax_module():
    """Allowed only where marked `# deferred:` with the reason (a heavy optional dependency)."""
    modules = _modules()
    hidden = [f"{path.relative_to(PACKAGE.parent)}:{line}: {text}"
              for path in modules.values() for line, text in _imports(path, modules)[1]
              if "# deferred:" not in text]
    assert not hidden, "\n".join(hidden)


def test_the_core_imports_no_tensorflow():
    """The models, the losses, the config schema, its resolution and the step build on a
    machine without TensorFlow (benchmarks/device.py's GPU machine has none)."""
    code = ("import sys; import e2_jax.models.e2, e2_jax.losses, e2_jax.config, e2_jax.spec, e2_jax.training.step; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
