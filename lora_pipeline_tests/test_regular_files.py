"""The one reader of batch and snapshot files: no symbolic links, nothing but regular files, bounded reads."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from lora_pipeline.core.datasets.sources.regular_files import (
    FileTooLarge,
    NotRegularFile,
    irregular_entries,
    is_regular,
    open_regular,
    read_regular,
    sha256_regular,
)


def test_a_regular_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"hdaesth, front view\n")
    with open_regular(path) as f:
        assert f.read() == b"hdaesth, front view\n"
    assert read_regular(path, 20) == b"hdaesth, front view\n" and is_regular(path)


def test_a_symbolic_link_is_refused_and_its_target_never_read(tmp_path: Path) -> None:
    secret = tmp_path / "outside.txt"
    secret.write_bytes(b"SECRET-FROM-OUTSIDE")
    link = tmp_path / "a.txt"
    link.symlink_to(secret)
    for read in (lambda: open_regular(link), lambda: read_regular(link, 1000)):
        with pytest.raises(NotRegularFile) as err:
            read()
        assert err.value.code == "symlink_not_followed"
        assert str(err.value) == f"{link}: symbolic link, not followed; nothing was read from it"
    assert not is_regular(link)


def test_a_fifo_or_a_folder_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "a.txt"
    os.mkfifo(fifo)  # a blocking open would wait for a writer forever
    started = time.monotonic()
    for path in (fifo, tmp_path):
        with pytest.raises(NotRegularFile) as err:
            read_regular(path, 1000)
        assert err.value.code == "not_a_regular_file"
    assert time.monotonic() - started < 5
    assert not is_regular(fifo) and not is_regular(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        read_regular(tmp_path / "missing", 1000)


def test_a_file_over_the_limit_is_refused_after_reading_only_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    path.write_bytes(b"x" * 11)
    assert read_regular(path, 11) == b"x" * 11
    with pytest.raises(FileTooLarge, match="larger than the limit of 10 bytes"):
        read_regular(path, 10)
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:
        f.truncate(8 << 30)  # 8 GiB (sparse): reading it whole would take far longer than the bound below
    started = time.monotonic()
    with pytest.raises(FileTooLarge):
        read_regular(huge, 64 * 1024)
    assert time.monotonic() - started < 1


def test_beneath_a_folder_no_link_on_the_way_down_is_followed(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (outside / "1_x").mkdir(parents=True)
    (outside / "1_x" / "a.txt").write_bytes(b"identical")
    (root / "img" / "2_x").mkdir(parents=True)
    (root / "img" / "2_x" / "a.txt").write_bytes(b"identical")
    os.symlink(outside / "1_x", root / "img" / "1_x")  # a whole folder linked out of the root
    inside = root / "img" / "2_x" / "a.txt"
    assert read_regular(inside, 100, beneath=root) == b"identical" and is_regular(inside, beneath=root)
    assert sha256_regular(inside, beneath=root) == hashlib.sha256(b"identical").hexdigest()
    linked = root / "img" / "1_x" / "a.txt"
    assert read_regular(linked, 100) == b"identical"  # without `beneath` only the last name is checked
    with pytest.raises(NotRegularFile) as err:
        read_regular(linked, 100, beneath=root)
    assert err.value.code == "symlink_not_followed" and str(err.value).startswith(f"{root / 'img' / '1_x'}: ")
    assert not is_regular(linked, beneath=root)
    for escape in (outside / "1_x" / "a.txt", root / "img" / ".." / ".." / "outside" / "1_x" / "a.txt"):
        with pytest.raises(NotRegularFile) as err:
            open_regular(escape, beneath=root)
        assert err.value.code == "outside_the_folder"
        assert not is_regular(escape, beneath=root)


def test_irregular_entries_lists_links_fifos_and_empty_folders_without_entering_a_link(tmp_path: Path) -> None:
    (tmp_path / "img" / "1_x").mkdir(parents=True)
    (tmp_path / "img" / "1_x" / "a.png").write_bytes(b"png")
    (tmp_path / "img" / "empty").mkdir()
    os.mkfifo(tmp_path / "img" / "1_x" / "b.png")
    os.symlink(tmp_path / "img" / "1_x", tmp_path / "img" / "2_x")
    os.symlink(tmp_path / "img" / "1_x" / "a.png", tmp_path / "img" / "1_x" / "c.png")
    assert irregular_entries(tmp_path) == ["img/1_x/b.png", "img/1_x/c.png", "img/2_x", "img/empty"]
