"""Auto-rebuild reads every spec; one that does not load is reported, never a reason to stop."""

from __future__ import annotations

import pytest
import yaml

from lora_pipeline.core.datasets.snapshot.autorebuild import latest_auto_rebuild_specs, write_auto_rebuild_specs
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.paths import DataRoot


def _spec(root: DataRoot, name: str, broken: bool = False) -> None:
    data = {"name": name, "trigger": "t", "repeats": 1, "auto_rebuild": True, "sources": [{"batch": "cur-*"}]}
    if broken:
        data["repeats"] = "lots"
    root.specs.mkdir(parents=True, exist_ok=True)
    root.spec_file(name).write_text(yaml.safe_dump(data))


def test_unreadable_specs_are_reported_and_a_family_whose_newest_spec_is_broken_waits(tmp_path):
    root = DataRoot(tmp_path)
    _spec(root, "fam-v1")
    _spec(root, "fam-v2", broken=True)  # the family's last word is unknown: no rebuild from v1
    _spec(root, "oth-v1", broken=True)  # an older broken spec does not matter for the newest one
    _spec(root, "oth-v2")
    specs, unreadable = latest_auto_rebuild_specs(root)
    assert [s.name for s in specs] == ["oth-v2"]
    assert sorted(str(e).split(":")[0] for e in unreadable) == [str(root.spec_file("fam-v2")),
                                                               str(root.spec_file("oth-v1"))]
    assert all("repeats: expected a whole number" in str(e) for e in unreadable)
    tick = write_auto_rebuild_specs(root, ["cur-2026-12"])
    assert tick.written == [] and len(tick.unreadable) == 2  # oth-v2 is not built yet: nothing to outgrow


def test_an_auto_rebuilt_version_records_the_version_it_was_rebuilt_from_as_its_parent(tmp_path, make_batch,
                                                                                        image_bytes):
    from lora_pipeline.core.datasets.snapshot.manifest import read_snapshot_info
    from lora_pipeline.core.datasets.snapshot.snapshot import build_snapshot
    from lora_pipeline.core.datasets.spec import load_spec
    from lora_pipeline.core.lineage.diff_text import parent_changes_markdown

    root = DataRoot(tmp_path)
    make_batch(root, "cur-1", {"a.png": image_bytes(1), "a.txt": "t, a"})
    _spec(root, "fam-v1")
    build_snapshot(root, load_spec(root.spec_file("fam-v1")), "test")
    make_batch(root, "cur-2", {"b.png": image_bytes(2), "b.txt": "t, b"})
    tick = write_auto_rebuild_specs(root, ["cur-2"])
    assert [(w.from_version, w.new_version) for w in tick.written] == [("fam-v1", "fam-v2")]
    spec = load_spec(root.spec_file("fam-v2"))
    assert spec.rebuilt_from == "fam-v1" and spec.sha256 != load_spec(root.spec_file("fam-v1")).sha256
    build_snapshot(root, spec, "test")
    assert read_snapshot_info(root.dataset("fam-v2")).parents == ["fam-v1"]  # no longer `[]`
    assert read_snapshot_info(root.dataset("fam-v1")).parents == []
    page = parent_changes_markdown(root, "fam-v2", captions=False)  # what dataset_snapshot's page shows
    assert "Changes from `fam-v1` to `fam-v2`: 1 added, 0 removed" in page and "`img/1_t/b.png`" in page


def test_rebuilt_from_must_name_a_built_version_of_the_same_family(tmp_path, make_batch, image_bytes):
    from lora_pipeline.core.datasets.snapshot.snapshot import plan_snapshot
    from lora_pipeline.core.datasets.spec import DatasetSpec, SourceRef

    root = DataRoot(tmp_path)
    make_batch(root, "cur-1", {"a.png": image_bytes(1)})
    for parent, message in (("fam-v1", "dataset version 'fam-v1' is not built"),
                            ("other-v1", "must be an earlier version of the family fam"),
                            ("fam-v2", "must be an earlier version of the family fam")):
        spec = DatasetSpec(name="fam-v2", trigger="t", repeats=1, sources=(SourceRef(batch="cur-1"),),
                           rebuilt_from=parent)
        with pytest.raises(UserError, match=message):
            plan_snapshot(root, spec)
