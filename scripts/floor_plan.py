"""The floor plan of a checkout, measured from its import graph (read with `ast`: nothing is imported).

    python scripts/floor_plan.py [CHECKOUT]      (default: the checkout this script is in)

lora_pipeline_tests/test_layout.py checks its rules on the same graph, read by `Checkout`.

What it measures is the package `lora_pipeline/` (tests, scripts and benchmarks sit on top of it and would only add
a layer):

- Modules and folders. A module is a .py file. A folder is a package: a module belongs to the package it is in, a
  package's `__init__.py` to that package itself. The module graph has an edge A -> B when A imports B anywhere in
  its file (inside functions too; `from P import m` of a submodule m is an edge to P.m, of a name defined in P an
  edge to P). The folder graph has an edge F -> G (F != G) when a module of F imports a module of G; it stands for
  those imports.
- Import layers, of each graph: longest-path layering after collapsing each cycle (strongly connected component)
  to one node. A node that imports nothing is on layer 1, any other one layer above the highest node it imports.
- Imports running back up: the fewest module imports that must go for the folder graph to have no cycle (its
  minimum feedback arc set, a folder edge weighing as many as the imports it stands for; a tie is settled the same
  way on every run). Where the folders form a DAG there are none. Where folders import each other, directly or
  round a longer cycle, the imports on the side that fewer imports take run back up against the flow all the
  others follow. At 242bb32, core/codeversion.py imported the package `lora_pipeline` (for __version__) while
  lora_pipeline/'s modules import core 13 times, and core/provenance.py and core/fielddocs.py imported
  core/datasets/ 4 times while core/datasets/ imports core's shared modules 53 times.
- The modules a `Recipe` travels through from `train_lora`: the modules within reach of train_lora's module in the
  module graph (itself included) that define a function or method with a parameter whose annotation names
  `Recipe` (`Recipe`, `Recipe | None`, ...). Those outside its reach that take one are listed apart.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SOURCE_FOLDERS = ("lora_pipeline", "lora_pipeline_tests", "scripts", "benchmarks")
PACKAGE = "lora_pipeline"
# train_lora's module: in core/training/ cut by job (since f4c3314), and in the flat one before it
TRAINERS = ("lora_pipeline.core.training.run.trainer", "lora_pipeline.core.training.trainer")
LARGEST_EXACT_CYCLE = 16  # folders; the feedback arc set is exact, and its cost doubles with each folder

FolderGraph = dict[str, dict[str, list[tuple[str, str]]]]
"""{folder: {folder it imports: [(module, module it imports), ...]}}"""


@dataclass(frozen=True)
class Import:
    """One name an import statement brings in: `import module [as bound]` or `from module import name [as bound]`."""

    module: str  # relative imports resolved
    name: str | None
    bound: str  # the name it binds in the importing module: `import a.b` binds a, a star import "*"
    line: int


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(f"{package}.")


class Checkout:
    """The Python files of a checkout's source folders, each parsed once."""

    def __init__(self, root: Path, folders: Iterable[str] = SOURCE_FOLDERS) -> None:
        self.root = root
        paths = [path for folder in folders for path in sorted((root / folder).rglob("*.py"))]
        self.modules = {self.module_name(path): path for path in paths}
        self.packages = {name for name, path in self.modules.items() if path.name == "__init__.py"}
        self._trees: dict[str, ast.Module] = {}
        self._imports: dict[str, list[Import]] = {}

    def module_name(self, path: Path) -> str:
        parts = list(path.relative_to(self.root).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    def folder(self, module: str) -> str:
        return module if module in self.packages else module.rpartition(".")[0]

    def tree(self, module: str) -> ast.Module:
        if module not in self._trees:
            self._trees[module] = ast.parse(self.modules[module].read_text(encoding="utf-8"))
        return self._trees[module]

    def import_statements(self, module: str) -> list[Import]:
        """Every import in the module's file, of any library, inside functions too."""
        if module not in self._imports:
            self._imports[module] = self._read_imports(module)
        return self._imports[module]

    def _read_imports(self, module: str) -> list[Import]:
        found = []
        package = self.folder(module)
        for node in ast.walk(self.tree(module)):
            if isinstance(node, ast.Import):
                found += [Import(alias.name, None, alias.asname or alias.name.split(".")[0], node.lineno)
                          for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                found += [Import(base, alias.name, alias.asname or alias.name, node.lineno) for alias in node.names]
        return found

    def project_imports(self, module: str) -> list[tuple[str, str | None, int]]:
        """(module imported, name taken from it or None, line) for every import of a project module."""
        found = []
        for statement in self.import_statements(module):
            submodule = f"{statement.module}.{statement.name}"
            if statement.name is None:
                if statement.module in self.modules:
                    found.append((statement.module, None, statement.line))
            elif submodule in self.modules:
                found.append((submodule, None, statement.line))
            elif statement.module in self.modules:
                found.append((statement.module, statement.name, statement.line))
        return found

    def graph(self, package: str = "") -> dict[str, set[str]]:
        """The module graph, of the modules within `package` (all when empty) and their imports among them."""
        names = [name for name in self.modules if not package or within(name, package)]
        return {name: {target for target, _, _ in self.project_imports(name) if not package or within(target, package)}
                for name in names}

    def folder_graph(self, edges: dict[str, set[str]]) -> FolderGraph:
        folders: FolderGraph = {self.folder(module): {} for module in edges}
        for module, targets in edges.items():
            for target in sorted(targets):
                if self.folder(module) != self.folder(target):
                    folders[self.folder(module)].setdefault(self.folder(target), []).append((module, target))
        return folders


def components(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components (Tarjan), each sorted; a node on no cycle is one alone."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def layers(edges: dict[str, set[str]]) -> dict[str, int]:
    """Each node's layer: 1 for a node that imports nothing, else one above the highest it imports; the nodes of a
    cycle share one layer."""
    found = components(edges)
    component_of = {node: i for i, component in enumerate(found) for node in component}
    layer: dict[int, int] = {}
    for i, component in enumerate(found):  # Tarjan yields a component after all those it reaches
        below = {component_of[target] for node in component for target in edges.get(node, ())} - {i}
        layer[i] = 1 + max((layer[j] for j in below), default=0)
    return {node: layer[component_of[node]] for node in edges}


def running_back_up(folders: FolderGraph) -> list[tuple[str, str]]:
    """The imports running back up (see the module's docstring), as (module, module it imports)."""
    found = []
    for component in components({folder: set(targets) for folder, targets in folders.items()}):
        if len(component) > LARGEST_EXACT_CYCLE:
            raise ValueError(f"a folder cycle through {len(component)} folders is too large to untangle exactly")
        weight = [[len(folders[u].get(v, ())) for v in component] for u in component]
        order = _lightest_order(weight)
        rank = {component[i]: position for position, i in enumerate(order)}
        found += [edge for u in component for v in component if rank[u] < rank[v] for edge in folders[u].get(v, ())]
    return sorted(found)


def _lightest_order(weight: list[list[int]]) -> list[int]:
    """The order of nodes, lowest first, whose imports from a lower node to a higher one weigh least in all (exact,
    over every subset of nodes: fine for the few folders of one cycle)."""
    count = len(weight)
    cost = [0] + [sys.maxsize] * ((1 << count) - 1)  # cost[s]: least weight with the nodes of s lowest
    last = [0] * (1 << count)
    for placed in range(1 << count):
        for node in range(count):
            if not placed >> node & 1:
                added = cost[placed] + sum(weight[i][node] for i in range(count) if placed >> i & 1)
                if added < cost[placed | 1 << node]:
                    cost[placed | 1 << node], last[placed | 1 << node] = added, node
    order, placed = [], (1 << count) - 1
    while placed:
        order.append(last[placed])
        placed &= ~(1 << last[placed])
    return order[::-1]


def reach(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for target in edges.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def names_recipe(annotation: ast.expr | None) -> bool:
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):  # a quoted annotation
        return names_recipe(ast.parse(annotation.value, mode="eval").body)
    return annotation is not None and any(
        getattr(node, "id", None) == "Recipe" or getattr(node, "attr", None) == "Recipe"  # Recipe, module.Recipe
        for node in ast.walk(annotation))


def takes_a_recipe(tree: ast.Module) -> bool:
    """Whether a function or method of the module has a parameter annotated with a type that names Recipe."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            arguments = node.args
            parameters = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs, arguments.vararg,
                          arguments.kwarg]
            if any(parameter and names_recipe(parameter.annotation) for parameter in parameters):
                return True
    return False


def report(root: Path) -> str:
    checkout = Checkout(root, [PACKAGE])
    edges = checkout.graph(PACKAGE)
    folders = checkout.folder_graph(edges)
    module_layers = max(layers(edges).values())
    folder_layers = max(layers({folder: set(targets) for folder, targets in folders.items()}).values())
    back_up = running_back_up(folders)
    lines = [f"floor plan of {root}/{PACKAGE}/ (read with ast)",
             f"modules and folders: {len(edges)} modules in {len(folders)} folders, {len(edges) + len(folders)} in all",
             f"import layers (cycles collapsed): {module_layers} of modules, {folder_layers} of folders",
             f"imports running back up: {len(back_up)}"]
    lines += [f"    {module} imports {target}" for module, target in back_up]
    trainer = next((name for name in TRAINERS if name in edges), None)
    if trainer is None:
        return "\n".join([*lines, f"no train_lora module: none of {', '.join(TRAINERS)}"])
    takers = {name for name in edges if takes_a_recipe(checkout.tree(name))}
    reached = sorted(takers & reach(edges, trainer))
    lines.append(f"a Recipe travels from train_lora ({trainer}) through {len(reached)} modules that take one:")
    lines += [f"    {name}" for name in reached]
    others = sorted(takers - set(reached))
    lines.append(f"modules out of its reach that take a Recipe: {len(others)}")
    lines += [f"    {name}" for name in others]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parents[1]
    print(report(root.resolve()))


if __name__ == "__main__":
    main(sys.argv[1:])
