"""The floor plan: the import graph read with `ast` (scripts/floor_plan.py reads it). No cycle between modules nor
between folders, no private name taken from another module, no two core modules of one file name, core/ free of
Dagster and of the layers above it, another library's private names used by one adapter module at most, and the
README's Layout section equal to the tree. Each rule is a function over a graph or a tree, and has a test that
hands it a planted violation as well as the test of the real tree."""

from __future__ import annotations

import ast
import re
import sys
from itertools import pairwise
from pathlib import Path

from scripts.floor_plan import Checkout, FolderGraph, within

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lora_pipeline"
CHECKOUT = Checkout(REPO)
ABOVE_CORE = ("dagster", "lora_pipeline.defs", "lora_pipeline.runs", "lora_pipeline.cli", "lora_pipeline.cli_jobs",
              "lora_pipeline.cli_records")


def plant(root: Path, files: dict[str, str]) -> Checkout:
    """A checkout of the given files (path: source) under root, each package with its `__init__.py`."""
    for name, source in files.items():
        for folder in Path(name).parents[:-1]:
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / "__init__.py").touch()
        (root / name).write_text(source, encoding="utf-8")
    return Checkout(root)


def cycle_in(edges: dict[str, set[str]]) -> list[str]:
    """One import cycle (as a path that returns to its start), or [] when the graph has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_the_cycle_finder_finds_a_cycle():
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_in({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) == []


def test_a_planted_import_cycle_is_found(tmp_path):
    planted = plant(tmp_path, {"lora_pipeline/core/a.py": "def f():\n    from lora_pipeline.core import b\n",
                               "lora_pipeline/core/b.py": "from . import a\n"})
    assert cycle_in(planted.graph()) == ["lora_pipeline.core.a", "lora_pipeline.core.b", "lora_pipeline.core.a"]


def test_the_import_graph_has_no_cycle():
    edges = CHECKOUT.graph()
    assert len(edges) > 60 and "lora_pipeline.core.paths" in edges["lora_pipeline.core.datasets.checks.gate"]
    assert cycle_in(edges) == []


def folder_cycle_in(folders: FolderGraph) -> list[str]:
    """One cycle of the folder graph as readable lines: the folders round it, then one import for each step; []
    when the folders form a DAG."""
    cycle = cycle_in({folder: set(targets) for folder, targets in folders.items()})
    if not cycle:
        return []
    steps = [folders[folder][target][0] for folder, target in pairwise(cycle)]
    return [" -> ".join(f"{folder.replace('.', '/')}/" for folder in cycle),
            *(f"{module} imports {target}" for module, target in steps)]


def test_a_planted_folder_cycle_is_found_where_no_module_cycle_is(tmp_path):
    planted = plant(tmp_path, {
        "lora_pipeline/core/training/recipe.py": "",
        "lora_pipeline/core/training/run/trainer.py": "from lora_pipeline.core.evaluation.grid import draw\n",
        "lora_pipeline/core/evaluation/grid.py": "def draw():\n    from lora_pipeline.core.training import recipe\n",
    })
    (tmp_path / "lora_pipeline/core/training/__init__.py").write_text(
        "from lora_pipeline.core.training.run import trainer\n", encoding="utf-8")  # the package's own folder
    assert cycle_in(planted.graph()) == []
    assert folder_cycle_in(planted.folder_graph(planted.graph())) == [
        "lora_pipeline/core/evaluation/ -> lora_pipeline/core/training/ -> lora_pipeline/core/training/run/"
        " -> lora_pipeline/core/evaluation/",
        "lora_pipeline.core.evaluation.grid imports lora_pipeline.core.training.recipe",
        "lora_pipeline.core.training imports lora_pipeline.core.training.run.trainer",
        "lora_pipeline.core.training.run.trainer imports lora_pipeline.core.evaluation.grid",
    ]


def test_the_folders_form_a_dag():
    edges = CHECKOUT.graph()
    assert "lora_pipeline.core.training.run" in CHECKOUT.folder_graph(edges)["lora_pipeline.core.evaluation"]
    cycle = folder_cycle_in(CHECKOUT.folder_graph(edges))
    assert not cycle, "\n".join(["the folders import each other round a cycle:", *cycle])


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_takes_a_private_name_from_another():
    taken = [f"{path.relative_to(REPO)}:{line} imports {name} from {source}"
             for module, path in CHECKOUT.modules.items() for source, name, line in CHECKOUT.project_imports(module)
             if name and is_private(name)]
    assert taken == []


def test_no_two_core_modules_share_a_file_name():
    names: dict[str, list[str]] = {}
    for path in sorted((PACKAGE / "core").rglob("*.py")):
        if path.name != "__init__.py":
            names.setdefault(path.name, []).append(str(path.relative_to(PACKAGE)))
    assert {name: paths for name, paths in names.items() if len(paths) > 1} == {}


def imports_of(checkout: Checkout, package: str, forbidden: tuple[str, ...]) -> list[str]:
    """`path:line imports name` for each import, inside functions too, by a module of `package` of a forbidden
    module or any module below one (full dotted names: `from a import b` imports a and a.b)."""
    found = []
    for module in (name for name in checkout.modules if within(name, package)):
        for statement in checkout.import_statements(module):
            names = [statement.module, f"{statement.module}.{statement.name}"] if statement.name else [statement.module]
            if name := next((n for n in names if any(within(n, above) for above in forbidden)), None):
                found.append(f"{checkout.modules[module].relative_to(checkout.root)}:{statement.line} imports {name}")
    return found


def test_planted_imports_of_dagster_and_the_layers_above_core_are_found(tmp_path):
    planted = plant(tmp_path, {
        "lora_pipeline/defs/jobs.py": "", "lora_pipeline/cli.py": "", "lora_pipeline/runs/queue.py": "",
        "lora_pipeline/core/a.py": "import dagster._core.events\nfrom lora_pipeline import cli\n",
        "lora_pipeline/core/b.py": "def f():\n    import lora_pipeline.defs.jobs\n    from ..runs import queue\n",
        "lora_pipeline/core/c.py": "from lora_pipeline.core import a\nimport lora_pipeline.cli_docs\nimport dagsterx\n",
        "lora_pipeline/defs/d.py": "import dagster\n",
    })
    assert imports_of(planted, "lora_pipeline.core", ABOVE_CORE) == [
        "lora_pipeline/core/a.py:1 imports dagster._core.events",
        "lora_pipeline/core/a.py:2 imports lora_pipeline.cli",
        "lora_pipeline/core/b.py:2 imports lora_pipeline.defs.jobs",
        "lora_pipeline/core/b.py:3 imports lora_pipeline.runs",
    ]


def test_core_does_not_import_dagster_nor_the_layers_above_it():
    assert "lora_pipeline.core.training.run.trainer" in CHECKOUT.modules
    assert imports_of(CHECKOUT, "lora_pipeline.core", ABOVE_CORE) == []


def private_uses(checkout: Checkout, package: str = "lora_pipeline") -> dict[str, set[str]]:
    """{library: the modules of `package` that use its private names} for each third-party library:
    `from lib._x import y`, `import lib._x`, `from lib.y import _z`, or `name._x` on a name an import of the
    library bound (`import torch` then `torch._foreach_add_`, `import dagster as dg` then `dg._core`)."""
    ours = {name.split(".")[0] for name in checkout.modules}
    uses: dict[str, set[str]] = {}
    for module in (name for name in checkout.modules if within(name, package)):
        bound: dict[str, str] = {}  # name in the module: the library its import binds it to
        for statement in checkout.import_statements(module):
            library = statement.module.split(".")[0]
            if library in ours or library in sys.stdlib_module_names:
                continue
            bound[statement.bound] = library
            if any(is_private(part) for part in [*statement.module.split(".")[1:], statement.name or ""]):
                uses.setdefault(library, set()).add(module)
        for node in ast.walk(checkout.tree(module)):
            if isinstance(node, ast.Attribute) and is_private(node.attr):
                root = node.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id in bound:
                    uses.setdefault(bound[root.id], set()).add(module)
    return uses


def shared_private_uses(uses: dict[str, set[str]]) -> dict[str, list[str]]:
    """The libraries whose private names more than one module uses (there should be one adapter module each)."""
    return {library: sorted(modules) for library, modules in sorted(uses.items()) if len(modules) > 1}


def test_private_names_of_a_library_used_by_two_modules_are_found(tmp_path):
    planted = plant(tmp_path, {
        "lora_pipeline/a.py": "import torch as t\n\ndef f(x):\n    return t.nn._reduction.get(x)\n",
        "lora_pipeline/b.py": "from torch.nn import _reduction\nfrom dagster._core.events import Event\n",
        "lora_pipeline/c.py": "def f():\n    import dagster as dg\n    return dg.asset\n",
        "lora_pipeline/d.py": "import os\nimport torch\n\nos._exit(torch.__version__ or torch.nn)\n",
        "lora_pipeline/e.py": "import yaml\nfrom lora_pipeline import _hidden\n\nclass A:\n    _x = yaml.safe_load\n",
        "lora_pipeline/f.py": "from mlflow.store import utils\nimport dagster.x as dx\n\nutils._get_x(dx._y)\n",
    })
    assert private_uses(planted) == {"torch": {"lora_pipeline.a", "lora_pipeline.b"},
                                     "dagster": {"lora_pipeline.b", "lora_pipeline.f"},
                                     "mlflow": {"lora_pipeline.f"}}
    assert shared_private_uses(private_uses(planted)) == {"dagster": ["lora_pipeline.b", "lora_pipeline.f"],
                                                          "torch": ["lora_pipeline.a", "lora_pipeline.b"]}


def test_private_names_of_each_library_are_used_by_one_adapter_module_at_most():
    assert shared_private_uses(private_uses(CHECKOUT)) == {}


def test_torchs_private_names_are_used_by_its_adapter_module_alone():
    assert private_uses(CHECKOUT)["torch"] == {"lora_pipeline.core.training.step.foreach"}  # torch._foreach_*


def readme_layout(text: str) -> dict[str, str]:
    """{path: its description} from the indented block of a README's `## Layout` section."""
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    entries: dict[str, str] = {}
    current = None
    for line in section.splitlines():
        if re.match(r"^ {4}\S", line):
            current, _, description = line.strip().partition(" ")
            entries[current] = description.strip()
        elif re.match(r"^ {5,}\S", line) and current:
            entries[current] += "\n" + line.strip()
    return entries


def layout_mismatches(layout: dict[str, str], root: Path) -> list[str]:
    """Where a README's Layout and the tree under root differ: a path that does not exist, a package not named, a
    package with no `modules:` list or with one other than its modules."""
    found = [f"README's Layout names {path}, which does not exist" for path in layout if not (root / path).exists()]
    for package in [p.parent for p in sorted((root / "lora_pipeline").rglob("__init__.py"))]:
        key = f"{package.relative_to(root).as_posix()}/"
        if key not in layout:
            found.append(f"README's Layout does not name the package {key}")
            continue
        listed = re.search(r"modules: (\w+(?:,\s+\w+)*)", layout[key])  # may wrap after a comma
        if not listed:
            found.append(f"README's Layout lists no `modules:` for {key}")
            continue
        modules = {name.strip() for name in listed.group(1).split(",")}
        actual = {p.stem for p in package.glob("*.py") if p.name != "__init__.py"}
        if modules != actual:
            extra, missing = sorted(modules - actual), sorted(actual - modules)
            found.append(f"{key}: README's Layout lists {extra} too many and misses {missing}")
    return found


def test_a_readme_layout_that_misses_a_module_or_a_package_is_reported(tmp_path):
    plant(tmp_path, {"lora_pipeline/cli.py": "", "lora_pipeline/core/paths.py": "", "lora_pipeline/core/names.py": "",
                     "lora_pipeline/defs/jobs.py": ""})
    readme = ("# x\n\n## Layout\n\nThe code:\n\n"
              "    lora_pipeline/        modules: cli\n"
              "    lora_pipeline/core/   plain Python\n"
              "                          modules: names,\n"
              "                          fileio\n"
              "    docs/                 the contract\n\n## Next\n")
    assert layout_mismatches(readme_layout(readme), tmp_path) == [
        "README's Layout names docs/, which does not exist",
        "lora_pipeline/core/: README's Layout lists ['fileio'] too many and misses ['paths']",
        "README's Layout does not name the package lora_pipeline/defs/",
    ]


def test_the_readme_layout_names_every_package_and_module_of_the_tree():
    assert layout_mismatches(readme_layout((REPO / "README.md").read_text(encoding="utf-8")), REPO) == []
