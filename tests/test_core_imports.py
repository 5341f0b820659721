"""A core that stands alone (issue 16): light imports, no adapter imports, no import cycles."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("transformers", "diffusers", "vllm")
CORE = (
    "guidance.ops",
    "guidance.schedules",
    "guidance.guiders",
    "guidance.branches",
    "guidance.perturbations",
    "guidance.adaptive",
    "guidance.spaces",
    "guidance.validation",
)
PURE_SAMPLERS = ("samplers.cfgpp", "samplers.kernels")
# Files of the functional core: they may import torch, the standard library and each other only.
CORE_PATHS = (
    "guidance/ops",
    "guidance/guiders",
    "guidance/schedules.py",
    "guidance/spaces.py",
    "guidance/adaptive.py",
    "guidance/validation.py",
    "guidance/classifier.py",
    "guidance/tensors.py",
    "guidance/branches.py",
    "guidance/perturbations",
)
FORBIDDEN_FOR_CORE = (
    "samplers",
    "guidance.lm",
    "guidance.diffusion",
    "guidance.vllm",
    "guidance.models",
    "guidance.cli",
    "demos",
    *HEAVY,
)


def _import_in_fresh_interpreter(modules: tuple[str, ...]) -> dict:
    """Import torch, then ``modules``; report the time the latter took and which heavy packages loaded."""
    code = (
        "import json, sys, time\n"
        "import torch\n"
        "start = time.perf_counter()\n"
        f"for name in {list(modules)!r}:\n"
        "    __import__(name)\n"
        "elapsed = time.perf_counter() - start\n"
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})\n"
        "print(json.dumps({'seconds': elapsed, 'heavy': heavy}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_core_imports_alone_and_fast():
    report = _import_in_fresh_interpreter(CORE)
    assert report["heavy"] == [], f"the core loaded {report['heavy']}"
    assert report["seconds"] < 1.0, f"importing the core took {report['seconds']:.2f} s after torch"


def test_pure_samplers_import_alone_and_fast():
    report = _import_in_fresh_interpreter(PURE_SAMPLERS)
    assert report["heavy"] == [], f"the pure samplers loaded {report['heavy']}"
    assert report["seconds"] < 1.0, f"importing the pure samplers took {report['seconds']:.2f} s after torch"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _python_files(*roots: str) -> list[Path]:
    files: list[Path] = []
    for root in roots:
        path = ROOT / root
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return files


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST):
    """Every node that can run: all of the tree except ``if TYPE_CHECKING:`` bodies (their ``else`` runs)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if _is_type_checking(node):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` for every import that can run, anywhere in the file (function bodies included)."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []
    for node in _runtime_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, [alias.name for alias in node.names]))
    return found


def test_core_never_imports_adapters_or_samplers():
    offenders = []
    for path in _python_files(*CORE_PATHS):
        for module, _ in _imports(path):
            if any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN_FOR_CORE):
                offenders.append(f"{path.relative_to(ROOT)} imports {module}")
    assert offenders == []


def _import_graph() -> dict[str, set[str]]:
    files = _python_files("guidance", "samplers")
    modules = {_module_name(path) for path in files}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for path in files:
        source = _module_name(path)
        for module, names in _imports(path):
            targets = [f"{module}.{name}" for name in names if f"{module}.{name}" in modules] or [module]
            graph[source].update(t for t in targets if t in modules and t != source)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    """Module-level graph of guidance + samplers from the AST, imports inside functions included.

    ``from package import name`` points at ``package.name`` when that is a module, else at the
    package; a package is not counted as imported by its own submodules (Python runs the parent's
    ``__init__`` first, which would make every re-exporting package a trivial cycle).
    """
    graph = _import_graph()
    assert "guidance.ops.cfg" in graph and graph["guidance.guiders.cfg"], "the graph was not built"
    # Known debt, one edge: the row kernels' wrappers hand long rows to the split kernels (a lazy
    # import, on CUDA only), and the split kernels reuse the row kernels' @triton.jit helpers.
    # Moving those helpers into a module of their own needs a GPU to re-check; until then this
    # edge is the only exception, and any other cycle fails.
    graph["samplers.kernels.triton_kernels"].discard("samplers.kernels.triton_split")
    assert _find_cycle(graph) is None, f"import cycle: {' -> '.join(_find_cycle(graph))}"


def test_cycle_finder_finds_cycles_and_skips_type_checking_imports():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\nelse:\n    import y\n"
    nodes = _runtime_nodes(ast.parse(source))
    assert sorted(a.name for n in nodes if isinstance(n, ast.Import) for a in n.names) == ["y"]


def _project_module_exports(module: str) -> set[str] | None:
    """Names a project module defines at top level (assignments, defs, imports, lazy ``__all__``); None if absent."""
    path = ROOT / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    if not path.exists():
        return None
    names: set[str] = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # lazy exports name their attributes in strings (__all__, _LAZY tables)
    if path.name == "__init__.py":
        names.update(child.stem for child in path.parent.iterdir() if child.suffix == ".py" or child.is_dir())
    return names


def test_every_project_import_names_something_that_exists():
    # Imports inside functions (lazy adapters, guidance.vllm, demos) run only in some environments:
    # check statically that each ``from guidance... import name`` still finds its module and name.
    missing = []
    for path in _python_files("guidance", "samplers", "demos", "benchmarks", "tests"):
        for module, names in _imports(path):
            if not module.startswith(("guidance", "samplers")):
                continue
            exports = _project_module_exports(module)
            if exports is None:
                missing.append(f"{_module_name(path)}: no module {module}")
                continue
            missing.extend(f"{_module_name(path)}: {module}.{n}" for n in names if n != "*" and n not in exports)
    assert not missing, "imports of names that do not exist:\n" + "\n".join(missing)
