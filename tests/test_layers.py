"""The package's imports (module level and inside functions, read from the source): no cycles, and
the model, solver and reward layers never import the run, its checks or the command line."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "alignprop"
# the layers above the models: the run and its objectives, the config checks, evaluation, the CLI,
# and the tiny random models (built from the families, never imported by them)
HIGH = {"trainer", "ddpo", "checks", "evaluation", "cli", "launcher", "objectives", "run", "tiny"}
LOW = ("families", "solvers", "rewards", "lora_io", "checkpoints", "soups", "models", "fast",
       "inference", "errors", "batching", "config_files", "prompts")  # fmt: skip


def module_names() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: the alignprop modules it imports}; `from pkg import name` counts pkg.name when it is a module."""
    mods = module_names()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                names = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
                ]
            else:
                continue
            deps |= {
                o for n in names if n.startswith("alignprop") and (o := owner(n)) not in (None, mod)
            }
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "alignprop.rewards.clip_models" in graph["alignprop.rewards.aesthetic"]  # from . import
    assert "alignprop.lora_io" in graph["alignprop.solvers.sampling"]  # inside a function


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def top(mod: str) -> str:
    """alignprop.rewards.hps -> rewards"""
    return mod.split(".")[1] if "." in mod else ""


def test_lower_layers_never_import_the_run_checks_or_cli():
    upward = [
        (mod, dep)
        for mod, deps in import_graph().items()
        if top(mod) in LOW
        for dep in deps
        if top(dep) in HIGH
    ]
    assert upward == []


def test_the_run_imports_no_objective():
    """scripts -> objectives -> run: the run gets its objective's class from the caller, and no
    objective module imports the compatibility names (trainer, ddpo) that sit above it."""
    graph = import_graph()
    assert not {top(d) for d in graph["alignprop.run"]} & {
        "objectives",
        "trainer",
        "ddpo",
        "checks",
        "cli",
    }
    wrong = [
        (mod, dep)
        for mod, deps in graph.items()
        if top(mod) == "objectives"
        for dep in deps
        if top(dep) in {"trainer", "ddpo", "checks", "cli", "launcher"}
    ]
    assert wrong == []


def test_no_library_function_is_over_80_lines():
    """A function (docstring included) longer than a screen is split into named steps."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append((path.name, node.name, lines))
    assert long == []
