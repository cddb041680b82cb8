"""Many images at once: one decode gives the checks and the kept thumbnails; an early start is handed over only
for exactly the same, unchanged files."""

from __future__ import annotations

import os

import numpy as np
import pytest

from lora_pipeline.core.datasets.checks import inspection
from lora_pipeline.core.datasets.checks.inspection import POOL_THRESHOLD, inspect_batch, start_early, take_early
from lora_pipeline.core.datasets.images import thumbnail

MAX = 10_000_000


@pytest.fixture
def files(tmp_path, picture):
    """POOL_THRESHOLD + 8 small pictures (so a process pool runs); 20.jpg holds PNG data (a problem of its own)."""
    paths = []
    for n in range(POOL_THRESHOLD + 8):
        path = tmp_path / f"{n:03d}.{'jpg' if n == 20 else 'png'}"
        picture(n, (48, 40)).save(path, format="PNG")
        paths.append(path)
    return paths


def test_thumbnails_kept_are_the_first_files_and_the_flagged_ones_and_equal_a_fresh_decode(files):
    found = inspect_batch(files, MAX, workers=1, thumbnails=3)
    assert sorted(found.thumbnails) == [0, 1, 2, 3, 4, 5, 20]  # 2 x 3 first files, then the flagged one
    assert [p.code for p in found.infos[20].problems] == ["extension_mismatch"]
    for i, thumb in found.thumbnails.items():
        assert np.array_equal(np.asarray(thumb), np.asarray(thumbnail(files[i])))  # what the sheet decodes anew


def test_an_early_start_is_handed_over_for_the_same_unchanged_files_only(files):
    assert take_early(files, MAX, 3) is None  # nothing started
    start_early(files, MAX, 3)  # a real process pool
    early = take_early(files, MAX, 3)
    assert early is not None and early.infos == inspect_batch(files, MAX, workers=1).infos
    assert sorted(early.thumbnails) == [0, 1, 2, 3, 4, 5, 20]
    assert take_early(files, MAX, 3) is None  # taken once

    start_early(files, MAX, 3, workers=1)
    assert take_early(files[:-1], MAX, 3) is None  # other files: not handed over (and stopped)
    assert inspection._early is None
    start_early(files, MAX, 3, workers=1)
    assert take_early(files, MAX // 2, 3) is None  # another pixel limit
    start_early(files, MAX, 3, workers=1)
    st = files[7].stat()
    files[7].write_bytes(files[8].read_bytes())  # rewritten after the start, its mtime put back: ctime tells
    os.utime(files[7], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert take_early(files, MAX, 3) is None
