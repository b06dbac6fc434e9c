"""The packages' import structure: no circle between modules, no import running up the floors, a CLI layer that
nothing imports, and function-level imports of the project's own modules only in that layer.

Imports are read from the source with ``ast``, function-level ones included (those are how circles hide).
The floors are those of docs/development.md ("Layout and the one-way flow"); keep the two in step.
"""

from __future__ import annotations

import ast
from importlib.metadata import entry_points
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vqa_constraints", "harness", "editing")

# Bottom first. A module sits on the floor of the longest prefix that names it (``editing.commands`` is CLI, the
# rest of ``editing`` is not). A module may import modules of its own floor or lower ones, never higher ones.
FLOORS = (
    ("base", ("vqa_constraints", "vqa_constraints.errors", "vqa_constraints.files", "vqa_constraints.records")),
    ("dataset", ("vqa_constraints.sources", "vqa_constraints.validation", "vqa_constraints.card",
                 "vqa_constraints.builder", "vqa_constraints.loading", "vqa_constraints.info",
                 "vqa_constraints.publish")),
    ("harness core", ("harness", "harness.hooks", "harness.bootstrap", "harness.runs", "harness.outputs",
                      "harness.scoring", "harness.results", "harness.shards")),
    ("models", ("harness.models",)),
    ("evaluation", ("harness.evaluate", "harness.run_merge", "harness.vllm_backend")),
    ("leaderboard and tracing", ("harness.leaderboard", "harness.tracing")),
    ("zoo", ("harness.zoo",)),
    ("editing", ("editing",)),
    ("study", ("harness.study",)),
    ("cli", ("vqa_constraints.cli", "vqa_constraints.argtypes", "vqa_constraints.commands", "vqa_constraints.__main__",
             "harness.cli", "editing.commands")),
)
CLI = "cli"


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = modules()


def floor_of(module: str) -> int:
    best = None
    for number, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (number, prefix)
    assert best is not None, f"{module} is on no floor: add it to FLOORS and docs/development.md"
    return best[0]


def _known(name: str) -> str | None:
    """The project module ``name`` refers to (a module, or the package holding a name), or None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import in ``module``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((_known(alias.name), child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package
                    for _ in range(child.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                for alias in child.names:  # `from pkg import module` imports that module
                    target = f"{base}.{alias.name}"
                    found.append((target if target in MODULES else _known(base), child.lineno, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return [(target, line, inside) for target, line, inside in found if target and target != module]


GRAPH = {module: imports(module) for module in MODULES}


def command_modules() -> set[str]:
    """The modules registered in the ``vqa_constraints.commands`` group (the dispatcher loads them by name)."""
    return {entry.module for entry in entry_points(group="vqa_constraints.commands")}


def test_every_module_has_a_floor():
    for module in MODULES:
        floor_of(module)


def test_no_import_runs_up_the_floors():
    upward = [f"{MODULES[m].relative_to(ROOT)}:{line}: {m} ({FLOORS[floor_of(m)][0]}) imports {t} "
              f"({FLOORS[floor_of(t)][0]})"
              for m, edges in GRAPH.items() for t, line, _ in edges if floor_of(t) > floor_of(m)]
    assert not upward, "imports running up the floors:\n" + "\n".join(upward)


def test_no_import_circle():
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in {t for t, _, _ in GRAPH[module]}:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in MODULES:
        if module not in index:
            visit(module)
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_nothing_imports_a_command_module():
    commands = command_modules()
    assert commands <= set(MODULES), commands - set(MODULES)
    importing = [f"{m} imports {t}" for m, edges in GRAPH.items() for t, _, _ in edges if t in commands]
    assert not importing, "command modules are loaded by the dispatcher only:\n" + "\n".join(importing)


def test_library_modules_import_the_project_at_the_top():
    """Only the CLI layer imports the project's modules inside functions (so that building every command's parser
    stays light); a library module's own dependencies are all in view at its top."""
    hidden = [f"{MODULES[m].relative_to(ROOT)}:{line}: {t}" for m, edges in GRAPH.items()
              if FLOORS[floor_of(m)][0] != CLI for t, line, inside in edges if inside]
    assert not hidden, "function-level imports of project modules outside the CLI layer:\n" + "\n".join(hidden)
