"""The house's shape: imports run one way (no cycle among abd_jax's modules) and the
boundaries of docs/design.md hold."""
import ast
import collections
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "abd_jax"


def _modules() -> dict:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports() -> dict:
    """{module: the abd_jax modules and third-party packages it imports}; `from a import b`
    counts as importing the module a.b when there is one, else a."""
    modules = _modules()
    graph = collections.defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                graph[name].update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                found = [s for s in subs if s in modules]
                graph[name].update(found or [node.module])
    return graph


def test_no_import_cycle():
    graph, modules = _imports(), _modules()
    state = {}

    def visit(module, path):
        state[module] = "open"
        for target in graph[module]:
            if target not in modules or target == "abd_jax":
                continue
            if state.get(target) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in modules:
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("module,forbidden", [
    ("abd_jax.losses", ("abd_jax.", "flax", "tensorflow_datasets")),  # pure jnp
    ("abd_jax.augment", ("abd_jax.models", "abd_jax.train", "abd_jax.methods", "flax")),
    ("abd_jax.sampling", ("abd_jax.",)),
    ("abd_jax.data", ("abd_jax.models", "abd_jax.train", "abd_jax.methods")),
    ("abd_jax.models", ("abd_jax.methods", "abd_jax.train", "abd_jax.data")),
    ("abd_jax.train", ("abd_jax.methods", "abd_jax.input_pipeline", "abd_jax.synthesis")),
    ("abd_jax.input_pipeline", ("abd_jax.train", "abd_jax.methods")),
    ("abd_jax.synthesis", ("abd_jax.methods",)),
    ("abd_jax.driver", ("abd_jax.methods", "abd_jax.runner")),
    ("abd_jax.plan", ("abd_jax.methods", "abd_jax.train", "abd_jax.models")),
])
def test_lower_modules_do_not_reach_up(module, forbidden):
    """A package's rule holds for each of its modules, which may import one another."""
    graph = _imports()
    for name in [m for m in graph if m == module or m.startswith(module + ".")]:
        imported = {i for i in graph[name] if not i.startswith(module + ".")}
        assert not {i for i in imported for f in forbidden if i.startswith(f)}, (name, imported)


def test_nothing_imports_main():
    assert not [m for m, targets in _imports().items() if "abd_jax.main" in targets]


def test_no_module_is_longer_than_about_400_lines():
    long = {m: len(p.read_text().splitlines()) for m, p in _modules().items()
            if len(p.read_text().splitlines()) > 420}
    assert not long, long
