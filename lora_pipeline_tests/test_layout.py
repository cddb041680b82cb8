"""The floor plan: the import graph read with `ast` (no cycle, no private name taken from another module, no two
core modules of one file name), core/ free of Dagster, and the README's Layout section equal to the tree."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lora_pipeline"
SOURCES = [PACKAGE, REPO / "lora_pipeline_tests", REPO / "scripts", REPO / "benchmarks"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for folder in SOURCES for p in sorted(folder.rglob("*.py"))}


def imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """(module imported, name taken from it or None, line) for every import of a project module, anywhere
    in the file (imports inside functions count: they are edges of the graph all the same)."""
    found = []
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names if alias.name in modules]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            if base not in modules:
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((submodule, None, node.lineno) if submodule in modules else (base, alias.name,
                                                                                            node.lineno))
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: {target for target, _, _ in imports(path, modules)} for name, path in modules.items()}


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


def test_the_import_graph_has_no_cycle():
    edges = graph()
    assert len(edges) > 60 and "lora_pipeline.core.paths" in edges["lora_pipeline.core.datasets.checks.gate"]
    assert cycle_in(edges) == []


def test_no_module_takes_a_private_name_from_another():
    modules = project_modules()
    taken = [f"{path.relative_to(REPO)}:{line} imports {name} from {source}"
             for path in modules.values() for source, name, line in imports(path, modules)
             if name and name.startswith("_") and not (name.startswith("__") and name.endswith("__"))]
    assert taken == []


def test_no_two_core_modules_share_a_file_name():
    names: dict[str, list[str]] = {}
    for path in sorted((PACKAGE / "core").rglob("*.py")):
        if path.name != "__init__.py":
            names.setdefault(path.name, []).append(str(path.relative_to(PACKAGE)))
    assert {name: paths for name, paths in names.items() if len(paths) > 1} == {}


def test_core_does_not_import_dagster():
    modules = project_modules()
    for name, path in modules.items():
        if name.startswith("lora_pipeline.core"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                     for alias in node.names}
            roots |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
            assert not roots & {"dagster", "lora_pipeline.defs"}, name


def readme_layout() -> dict[str, str]:
    """{path: its description} from the indented block of the README's `## Layout` section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
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


def test_the_readme_layout_names_every_package_and_module_of_the_tree():
    layout = readme_layout()
    for path in layout:
        assert (REPO / path).exists(), f"README's Layout names {path}, which does not exist"
    packages = [p.parent for p in sorted(PACKAGE.rglob("__init__.py"))]
    for package in packages:
        key = f"{package.relative_to(REPO).as_posix()}/"
        assert key in layout, f"README's Layout does not name the package {key}"
        listed = re.search(r"modules: (\w+(?:,\s+\w+)*)", layout[key])  # may wrap after a comma
        assert listed, f"README's Layout lists no `modules:` for {key}"
        modules = {name.strip() for name in listed.group(1).split(",")}
        actual = {p.stem for p in package.glob("*.py") if p.name != "__init__.py"}
        extra, missing = sorted(modules - actual), sorted(actual - modules)
        assert modules == actual, f"{key}: README's Layout lists {extra} too many and misses {missing}"
