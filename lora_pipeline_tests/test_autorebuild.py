"""Auto-rebuild reads every spec; one that does not load is reported, never a reason to stop."""

from __future__ import annotations

import yaml

from lora_pipeline.core.datasets.snapshot.autorebuild import latest_auto_rebuild_specs, write_auto_rebuild_specs
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
