"""scripts/floor_plan.py's measures on hand-made graphs, and its report of this checkout."""

from __future__ import annotations

import ast
from pathlib import Path

from scripts.floor_plan import components, layers, report, running_back_up, takes_a_recipe

REPO = Path(__file__).resolve().parents[1]


def test_a_cycle_is_one_component_on_one_layer():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"b", "d"}, "d": set(), "e": {"a", "d"}}
    assert components(edges) == [["d"], ["b", "c"], ["a"], ["e"]]
    assert layers(edges) == {"a": 3, "b": 2, "c": 2, "d": 1, "e": 4}


def test_the_imports_running_back_up_are_the_fewest_that_untangle_the_folders():
    folders = {
        "p": {"q": [("p.x", "q.y")], "s": [("p.x", "s.z")]},
        "q": {"p": [("q.a", "p.b"), ("q.c", "p.b")], "r": [("q.a", "r.t")]},
        "r": {"p": [("r.t", "p.b"), ("r.u", "p.b")]},
        "s": {},
    }
    assert running_back_up(folders) == [("p.x", "q.y")]
    assert running_back_up({"p": {"q": [("p.x", "q.y")]}, "q": {}}) == []


def test_a_module_takes_a_recipe_when_a_parameter_annotation_names_it():
    def takes(source: str) -> bool:
        return takes_a_recipe(ast.parse(source))

    assert takes("def f(x, *, recipe: Recipe | None = None): pass")
    assert takes("class A:\n    async def f(self, recipe: 'recipe_module.Recipe'): pass")
    assert takes("def f(*recipes: Recipe): pass")
    assert not takes("def f(recipe: Any) -> Recipe: pass\nrecipe: Recipe = load()")


def test_the_report_of_this_checkout():
    lines = report(REPO).splitlines()
    assert "imports running back up: 0" in lines
    assert "    lora_pipeline.core.training.run.trainer" in lines
