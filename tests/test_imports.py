"""The house's structure: every module imports, no import cycle, no upward import, and
refgpt.kernels imports nothing from refgpt (the layers of docs/architecture.md).

The graph is read from the source (every import statement, a function's lazy ones too), so a
cycle that only closes at run time is caught as well."""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A module may import from its own layer and the ones below. The layers, bottom up:
LAYERS = [
    ("refgpt.kernels",),                                          # compute kernels
    ("refgpt.config", "refgpt.cli", "refgpt.precision", "refgpt.backend"),   # settings, backend
    ("refgpt.nn", "refgpt.optim", "refgpt.data", "refgpt.timers", "refgpt.metrics",
     "refgpt.checkpoint", "refgpt.checkpoint_shards", "refgpt.dump", "refgpt.interop"),  # the model and its parts
    ("refgpt.parallel",),                                         # the layouts
    ("refgpt.engine",),                                           # one rank's training
    ("refgpt.train", "refgpt.generate", "refgpt.validate", "refgpt.prepare", "refgpt.convert",
     "refgpt.study", "refgpt.plan"),                                             # the entry points
]


def modules() -> dict[str, Path]:
    """{dotted name: file} of refgpt and its kernels (installed as refgpt.kernels)."""
    found = {}
    for top, name in ((ROOT / "refgpt", "refgpt"), (ROOT / "kernels", "refgpt.kernels")):
        for path in sorted(top.rglob("*.py")):
            parts = [name, *path.relative_to(top).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set) -> set[str]:
    """The modules of the house that the module imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):            # from base import a: base.a if
            base = node.module or ""                        # that is a module, else base
            if node.level:
                base = importlib.util.resolve_name("." * node.level + base, package)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        for t in targets:
            while t and t not in known:                # refgpt.nn.gpt.GPT -> refgpt.nn.gpt
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def layer(name: str) -> int:
    for i, tops in enumerate(LAYERS):
        if any(name == t or name.startswith(t + ".") for t in tops):
            return i
    return len(LAYERS) if name == "refgpt" else -1


def test_every_module_imports():
    """Each module imports on its own; those that need CuPy fail for want of it only."""
    for name in modules():
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            assert e.name.split(".")[0] in ("cupy", "cupy_backends"), (name, e)


def test_every_module_has_a_layer():
    assert [n for n in modules() if layer(n) < 0] == []


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [(a, b) for a, deps in graph().items() for b in deps
              if b != "refgpt" and layer(b) > layer(a)]
    assert upward == []


def test_kernels_import_nothing_from_refgpt():
    g = graph()
    assert {(a, b) for a in g if layer(a) == 0 for b in g[a] if layer(b) != 0} == set()


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of a graph, each as the path that closes it."""
    state, found = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"
    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path):
    """The checks themselves, on two made-up modules: refgpt.nn.gpt importing the engine (an
    upward import) and refgpt.engine.step importing it back inside a function."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import numpy\nimport refgpt.engine.step\n")
    b.write_text("def f():\n    from ..nn import gpt\n")
    known = {"refgpt.nn", "refgpt.nn.gpt", "refgpt.engine", "refgpt.engine.step"}
    g = {"refgpt.nn.gpt": imports("refgpt.nn.gpt", a, known),
         "refgpt.engine.step": imports("refgpt.engine.step", b, known)}
    assert g == {"refgpt.nn.gpt": {"refgpt.engine.step"}, "refgpt.engine.step": {"refgpt.nn.gpt"}}
    assert layer("refgpt.engine.step") > layer("refgpt.nn.gpt")
    assert cycles(g) == [["refgpt.engine.step", "refgpt.nn.gpt", "refgpt.engine.step"]]


@pytest.mark.parametrize("name", ["refgpt.backend", "refgpt.nn.gpt", "refgpt.parallel.build"])
def test_no_module_sets_the_environment_on_import(name, monkeypatch):
    """Importing the library changes no environment variable (the entry points set what the
    process needs: refgpt.parallel.threads.quiet_openblas)."""
    import os
    import sys
    before = dict(os.environ)
    for mod in [m for m in sys.modules if m == "refgpt" or m.startswith("refgpt.")]:
        monkeypatch.delitem(sys.modules, mod)
    importlib.import_module(name)
    assert dict(os.environ) == before
