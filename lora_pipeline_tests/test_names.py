"""The one name rule for everything that becomes a path segment or a partition key."""

from __future__ import annotations

import pytest

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.names import MAX_NAME_LENGTH, is_name, require_name
from lora_pipeline.core.paths import DataRoot

VALID = ["hardware-design-aesthetic-v1", "b1", "demo_tiny.2", "0-start", "A" * MAX_NAME_LENGTH]


@pytest.mark.parametrize("name", VALID)
def test_valid_names(name):
    assert is_name(name)
    assert require_name(name, "batch id") == name


@pytest.mark.parametrize(
    "name",
    ["", "b1\n", "a/b", "../x", "..", ".hidden", "a\0b", "a b", "a,b", "/any/dir/y", "a\\b", "-flag", "ünï",
     "A" * (MAX_NAME_LENGTH + 1), "x\r"],
)
def test_unsafe_names_are_refused(name):
    assert not is_name(name)
    with pytest.raises(UserError, match="^recipe: "):
        require_name(name, "recipe")


def test_a_path_given_as_a_name_is_called_a_path():
    with pytest.raises(UserError, match="give the name, not a path"):
        require_name("../datasets/mini-v1", "dataset version")


def test_data_root_refuses_names_that_would_leave_their_folder(tmp_path):
    root = DataRoot(tmp_path)
    for build in (lambda: root.spec_file("/any/dir/y"), lambda: root.dataset("../datasets"),
                  lambda: root.batch("b1\n"), lambda: root.loras("v1", "../../x"), lambda: root.recipe_file("..")):
        with pytest.raises(UserError):
            build()
    assert root.loras("v1", "r") == tmp_path / "loras" / "v1" / "r"


def test_listings_skip_misnamed_entries_and_say_so(tmp_path):
    root = DataRoot(tmp_path)
    for batch in ("good-1", "bad name", ".hidden"):
        (root.batch("good-1") if batch == "good-1" else root.sources / batch).mkdir(parents=True)
        (root.sources / batch / "_READY").write_text("")
    root.specs.mkdir()
    (root.specs / "ok-v1.yaml").write_text("")
    (root.specs / "no good.yaml").write_text("")
    assert root.ready_batches() == ["good-1"]
    assert root.spec_versions() == ["ok-v1"]
    assert root.misnamed_entries() == [root.sources / "bad name", root.specs / "no good.yaml"]  # hidden: never content


def test_built_versions_leave_out_staging_folders(tmp_path):
    root = DataRoot(tmp_path)
    for folder in ("v-1", ".v-2.tmp-1-ab"):
        (root.datasets / folder).mkdir(parents=True)
        (root.datasets / folder / "snapshot.json").write_text("{}")
    assert root.built_versions() == ["v-1"]
