"""The shape of src/tunesmith, enforced by reading its source with `ast` (nothing is imported or run).

Rules, one test each, every failure listing all offenders as `path:line: what is wrong`:

- layers: every module belongs to a layer and imports only its own layer or lower ones (STYLE.md, "Layout
  shows the architecture"): errors < config < data = datatools < model < sampling < training < inference
  < board < top (cli, demos, env, __main__, the package itself); `algorithms` may be imported by anyone and imports
  nothing of ours but `errors` and other `algorithms` modules; `data` must not import `datatools`.
- no import cycles between modules.
- functions are at most 60 lines, files at most 400 lines.
- public functions and methods: at least 90% fully annotated, at least 75% with a docstring.

How imports are counted: every `import` / `from ... import` statement anywhere in a file (module level,
inside functions, under `if TYPE_CHECKING`), relative ones resolved against the file's package, plus
`importlib.import_module("literal")`. `from tunesmith.x import y` is an import of the module tunesmith.x.y
when that module exists, else of tunesmith.x (its __init__.py). `import tunesmith.x.y` counts as an import
of tunesmith.x.y only: the parent packages Python runs on the way are not counted, or every module would
depend on tunesmith/__init__.py.
"""

from __future__ import annotations

import ast
import functools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "src" / "tunesmith"
DATA_DIRS = ("resources",)  # package data, not code

MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 400
MIN_ANNOTATED = 0.90
MIN_DOCUMENTED = 0.75

# (dotted prefix, layer): a module belongs to the first entry that is its name or a package above it.
LAYER_PREFIXES = (
    ("tunesmith.errors", "errors"),
    ("tunesmith.algorithms", "algorithms"),
    ("tunesmith.config", "config"),
    ("tunesmith.datatools", "datatools"),
    ("tunesmith.data", "data"),
    ("tunesmith.model", "model"),
    ("tunesmith.sampling", "sampling"),
    ("tunesmith.training", "training"),
    ("tunesmith.inference", "inference"),
    ("tunesmith.board", "board"),
    ("tunesmith.cli", "top"),
    ("tunesmith.demos", "top"),
    ("tunesmith.env", "top"),
    ("tunesmith.__main__", "top"),
)
RANK = {"errors": 0, "config": 1, "data": 2, "datatools": 2, "model": 3, "sampling": 4, "training": 5,
        "inference": 6, "board": 7, "top": 8}
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool
    source: str
    tree: ast.Module

    def where(self, line: int) -> str:
        return f"{self.path.relative_to(ROOT)}:{line}"


@dataclass(frozen=True)
class Import:
    source: Module
    target: str
    line: int


@functools.cache
def modules() -> dict[str, Module]:
    """Every .py file under src/tunesmith, by dotted module name (a package by its __init__.py)."""
    found = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        relative = path.relative_to(PACKAGE_DIR)
        if relative.parts[0] in DATA_DIRS:
            continue
        parts = ["tunesmith", *relative.with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        source = path.read_text(encoding="utf-8")
        found[name] = Module(name, path, is_package, source, ast.parse(source, filename=str(path)))
    return found


def is_ours(name: str) -> bool:
    return name == "tunesmith" or name.startswith("tunesmith.")


def absolute_base(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imported_names(module: Module) -> Iterator[tuple[str, int]]:
    """(dotted name, line) for every import in the file, lazy or not, before resolving to a module."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = absolute_base(module, node)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield (submodule if submodule in modules() else base), node.lineno
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node.args[0].value, node.lineno


@functools.cache
def imports() -> tuple[Import, ...]:
    """Every import of one tunesmith module by another (a module naming itself is left out). A name that
    is no file of ours (a module being moved) is kept as written, so its layer still follows its name."""
    found = []
    for module in modules().values():
        for name, line in imported_names(module):
            if is_ours(name) and name != module.name:
                found.append(Import(module, name, line))
    return tuple(found)


def layer_of(name: str) -> str | None:
    if name == "tunesmith":
        return "top"
    for prefix, layer in LAYER_PREFIXES:
        if name == prefix or name.startswith(prefix + "."):
            return layer
    return None


def may_import(importer: str, imported: str) -> bool:
    if importer == "algorithms":
        return imported in ("errors", "algorithms")
    if imported == "algorithms":
        return True
    if (importer, imported) == ("data", "datatools"):
        return False
    return RANK[imported] <= RANK[importer]


def report(title: str, offenders: list[str]) -> str:
    return f"{title} ({len(offenders)}):\n  " + "\n  ".join(offenders)


def test_every_module_has_a_layer():
    unplaced = [f"{module.where(1)}: {name} belongs to no layer; add it to LAYER_PREFIXES deliberately"
                for name, module in modules().items() if layer_of(name) is None]
    assert not unplaced, report("modules outside the layer map", unplaced)


def test_imports_point_down_the_layers():
    offenders = []
    for edge in imports():
        importer, imported = layer_of(edge.source.name), layer_of(edge.target)
        if importer and imported and not may_import(importer, imported):
            offenders.append(f"{edge.source.where(edge.line)}: {edge.source.name} ({importer}) "
                             f"imports {edge.target} ({imported})")
    assert not offenders, report("imports against the layer order", offenders)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one module (each one holds a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def shortest_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, staying inside the component."""
    start, inside = component[0], set(component)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for successor in sorted(graph[node] & inside):
            if successor == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if successor not in came_from:
                came_from[successor] = node
                queue.append(successor)
    raise AssertionError(f"no cycle through {start}")


def test_no_import_cycles():
    graph: dict[str, set[str]] = {name: set() for name in modules()}
    first_line: dict[tuple[str, str], str] = {}
    for edge in imports():
        graph[edge.source.name].add(edge.target)
        first_line.setdefault((edge.source.name, edge.target), edge.source.where(edge.line))
    cycles = []
    for component in strongly_connected(graph):
        path = shortest_cycle(graph, component)
        steps = " -> ".join(f"{a} ({first_line[a, b]})" for a, b in zip(path, path[1:]))
        cycles.append(f"{steps} -> {path[0]}   [component of {len(component)}: {', '.join(component)}]")
    assert not cycles, report("import cycles", cycles)


def functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) for every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, FUNCTIONS):
            yield prefix + node.name, node
            yield from functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from functions(node, f"{prefix}{node.name}.")
        else:
            yield from functions(node, prefix)


def test_functions_are_short():
    """A function's length runs from its `def` line to its last line: decorators are not counted,
    while its docstring, comments, blank lines and nested functions are."""
    offenders = []
    for module in modules().values():
        for name, node in functions(module.tree):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                offenders.append(f"{module.where(node.lineno)}: {name} is {length} lines")
    assert not offenders, report(f"functions over {MAX_FUNCTION_LINES} lines", offenders)


def test_files_are_short():
    offenders = []
    for module in modules().values():
        length = len(module.source.splitlines())
        if length > MAX_FILE_LINES:
            offenders.append(f"{module.path.relative_to(ROOT)}: {length} lines")
    assert not offenders, report(f"files over {MAX_FILE_LINES} lines", offenders)


def is_public(name: str) -> bool:
    return not name.startswith("_")  # dunders included: __init__ and friends are not counted


def public_functions() -> Iterator[tuple[Module, str, ast.FunctionDef | ast.AsyncFunctionDef, bool]]:
    """(module, name, node, is_method): module-level functions and methods of module-level classes whose
    names (and class names) do not start with `_`; nested functions are implementation detail."""
    for module in modules().values():
        for node in module.tree.body:
            if isinstance(node, FUNCTIONS) and is_public(node.name):
                yield module, node.name, node, False
            elif isinstance(node, ast.ClassDef) and is_public(node.name):
                for item in node.body:
                    if isinstance(item, FUNCTIONS) and is_public(item.name):
                        yield module, f"{node.name}.{item.name}", item, True


def unannotated(node: ast.FunctionDef | ast.AsyncFunctionDef, is_method: bool) -> list[str]:
    """Parameters (and `return`) without an annotation; a method's first parameter (self/cls) is exempt."""
    arguments = node.args
    parameters = [*arguments.posonlyargs, *arguments.args]
    is_static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list)
    if is_method and not is_static:
        parameters = parameters[1:]
    parameters += [*arguments.kwonlyargs, *(a for a in (arguments.vararg, arguments.kwarg) if a)]
    missing = [parameter.arg for parameter in parameters if parameter.annotation is None]
    return missing + (["return"] if node.returns is None else [])


def test_public_functions_are_annotated():
    offenders, total = [], 0
    for module, name, node, is_method in public_functions():
        total += 1
        if missing := unannotated(node, is_method):
            offenders.append(f"{module.where(node.lineno)}: {name} lacks annotations on {', '.join(missing)}")
    share = 1 - len(offenders) / max(total, 1)
    print(f"annotated: {share:.1%} of {total} public functions and methods")
    assert share >= MIN_ANNOTATED, report(
        f"{share:.1%} of {total} public functions and methods are fully annotated, "
        f"need {MIN_ANNOTATED:.0%}; not annotated", offenders)


def test_public_functions_are_documented():
    offenders, total = [], 0
    for module, name, node, _ in public_functions():
        total += 1
        if ast.get_docstring(node) is None:
            offenders.append(f"{module.where(node.lineno)}: {name} has no docstring")
    share = 1 - len(offenders) / max(total, 1)
    print(f"documented: {share:.1%} of {total} public functions and methods")
    assert share >= MIN_DOCUMENTED, report(
        f"{share:.1%} of {total} public functions and methods have a docstring, "
        f"need {MIN_DOCUMENTED:.0%}; undocumented", offenders)
