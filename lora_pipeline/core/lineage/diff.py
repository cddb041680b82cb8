"""What changed between two dataset versions: `lora-pipeline diff <v1> <v2>` and the snapshot page's changes.

Everything comes from the two versions' `manifest.jsonl` and `snapshot.json` (and the caption `.txt` files of the
pairs whose caption hashes differ). An image of the new version is paired with one of the old version by, in turn:

1. the same source file (the batch and path it entered the pipeline from, through any earlier versions);
2. the same snapshot path (say a corrected batch that delivers `a.png` again, the old batch left out);
3. the same sha256 (the same bytes from another source or under another name).

A pair with another sha256 is **replaced**; one with the same sha256 under another snapshot path is **moved** (a
new `repeats` or trigger renames the folder; a name collision renames the file); the rest are unchanged. The
source file comes first so that a collision rename (`a.png` becoming `a__<batch>.png` because a new batch also
has an `a.png`) reads as a move plus an addition, not as a replacement.

Images left without a partner are **removed** (old) or **added** (new). The captions of every pair are compared;
a different text is a caption change with a word diff (`[-old words-] {+new words+}`, as `git diff --word-diff`).
Per-batch counts group the images by the batch they entered the pipeline from. Spec changes compare the resolved
specs field by field (dotted paths, lists as a whole), without `name`.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lora_pipeline.core.datasets.captions.caption_files import snapshot_caption
from lora_pipeline.core.datasets.snapshot.manifest import (
    IMAGE_KINDS,
    ManifestRow,
    SnapshotInfo,
    read_manifest,
    read_snapshot_info,
)
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.names import closest_names
from lora_pipeline.core.paths import SNAPSHOT, DataRoot

CAPTION_KINDS = ("caption", "reg_caption")


@dataclass(frozen=True)
class VersionFiles:
    """One version as the diff reads it: snapshot.json, its image rows and its caption rows by image path."""

    version: str
    dir: Path
    info: SnapshotInfo
    images: list[ManifestRow]
    captions: dict[str, ManifestRow]  # image path -> its caption row; empty until caption_set recorded them

    def caption_text(self, image: str) -> str | None:
        row = self.captions.get(image)
        return None if row is None else snapshot_caption(self.dir / row.path)


def load_version(root: DataRoot, version: str) -> VersionFiles:
    """The manifest and snapshot.json of a built version; a one-line UserError when it is not built."""
    folder = root.dataset(version)
    if not (folder / SNAPSHOT).is_file():
        raise UserError(
            f"dataset version '{version}' is not built{closest_names(version, root.built_versions())}", folder
        )
    rows = read_manifest(folder)
    return VersionFiles(
        version=version,
        dir=folder,
        info=read_snapshot_info(folder),
        images=sorted((r for r in rows if r.kind in IMAGE_KINDS), key=lambda r: r.path),
        captions={r.image: r for r in rows if r.kind in CAPTION_KINDS and r.image},
    )


def origin(row: ManifestRow) -> tuple[str, str]:
    """(batch, path) the image entered the pipeline from, through any earlier versions it was copied from."""
    if row.origin_batch:
        return row.origin_batch, row.origin_path or ""
    if row.source_batch:
        return row.source_batch, row.source_path or ""
    return f"dataset:{row.source_dataset}", row.source_path or ""  # a row written before origins were recorded


@dataclass(frozen=True)
class ImageEntry:
    """An added or removed image: its snapshot path, bytes and source file."""

    path: str
    sha256: str
    batch: str
    source_path: str


@dataclass(frozen=True)
class ImagePair:
    """A replaced or moved image: where it was, where it is, and both hashes."""

    old_path: str
    path: str
    old_sha256: str
    sha256: str
    batch: str
    source_path: str


@dataclass(frozen=True)
class CaptionChange:
    image: str  # in the new version
    old: str
    new: str
    word_diff: str
    removed_words: list[str]
    added_words: list[str]


@dataclass(frozen=True)
class BatchCount:
    """Images per origin batch in each version, and the changes that touched the batch."""

    batch: str
    old: int
    new: int
    added: int = 0
    removed: int = 0
    replaced: int = 0


@dataclass(frozen=True)
class SpecChange:
    field: str  # dotted path into the resolved spec
    old: Any
    new: Any


@dataclass
class VersionDiff:
    old: str
    new: str
    old_manifest_root: str
    new_manifest_root: str
    added: list[ImageEntry] = field(default_factory=list)
    removed: list[ImageEntry] = field(default_factory=list)
    replaced: list[ImagePair] = field(default_factory=list)
    moved: list[ImagePair] = field(default_factory=list)
    unchanged: int = 0
    captions_compared: bool = True  # False while either version's captions are not recorded yet
    captions_changed: list[CaptionChange] = field(default_factory=list)
    batches: list[BatchCount] = field(default_factory=list)
    spec_changes: list[SpecChange] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not (
            self.added or self.removed or self.replaced or self.moved or self.captions_changed or self.spec_changes
        )

    def to_json_dict(self) -> dict[str, Any]:
        return {**asdict(self), "identical": self.identical}


_TOKENS = re.compile(r"[^\s,]+|,")


def _joined(tokens: list[str]) -> str:
    """Tokens as text: a space between words, none before a comma."""
    return "".join(t if i == 0 or t.startswith(",") else " " + t for i, t in enumerate(tokens))


def word_diff(old: str, new: str) -> tuple[str, list[str], list[str]]:
    """(`[-removed-] {+added+}` marked text, removed words, added words); a comma is a token of its own, so a
    caption's tags diff as words, not as `body,` against `body`."""
    a, b = _TOKENS.findall(old), _TOKENS.findall(new)
    pieces: list[str] = []
    removed: list[str] = []
    added: list[str] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(lambda t: t == ",", a, b, autojunk=False).get_opcodes():
        if op == "equal":
            pieces += a[i1:i2]
            continue
        if i2 > i1:
            pieces.append("[-" + _joined(a[i1:i2]) + "-]")
            removed += [t for t in a[i1:i2] if t != ","]
        if j2 > j1:
            pieces.append("{+" + _joined(b[j1:j2]) + "+}")
            added += [t for t in b[j1:j2] if t != ","]
    return _joined(pieces), removed, added


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and (value or not prefix):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def spec_changes(old: dict[str, Any], new: dict[str, Any]) -> list[SpecChange]:
    """Fields of the resolved specs that differ (a field one side lacks is None there); `name` is left out."""
    a, b = _flatten(old), _flatten(new)
    return [
        SpecChange(key, a.get(key), b.get(key))
        for key in sorted(set(a) | set(b))
        if key != "name" and a.get(key) != b.get(key)
    ]


def _entry(row: ManifestRow) -> ImageEntry:
    batch, path = origin(row)
    return ImageEntry(path=row.path, sha256=row.sha256, batch=batch, source_path=path)


def _pair(old: ManifestRow, new: ManifestRow) -> ImagePair:
    batch, path = origin(new)
    return ImagePair(
        old_path=old.path, path=new.path, old_sha256=old.sha256, sha256=new.sha256, batch=batch, source_path=path
    )


def _match(old_rows: list[ManifestRow], new_rows: list[ManifestRow]) -> list[tuple[ManifestRow, ManifestRow]]:
    """Pairs (old, new) by source file, then path, then sha256 (the module doc); each row in one pair at most."""
    pairs: list[tuple[ManifestRow, ManifestRow]] = []
    old_left, new_left = list(old_rows), list(new_rows)
    for key in (origin, lambda r: r.path, lambda r: r.sha256):
        waiting: dict[Any, list[ManifestRow]] = defaultdict(list)
        for row in old_left:
            waiting[key(row)].append(row)
        unpaired = []
        for row in new_left:
            candidates = waiting.get(key(row))
            if candidates:
                pairs.append((candidates.pop(0), row))
            else:
                unpaired.append(row)
        old_left = [row for rows in waiting.values() for row in rows]
        new_left = unpaired
    return pairs


def _caption_change(old: VersionFiles, new: VersionFiles, old_image: str, new_image: str) -> CaptionChange | None:
    before, after = old.captions.get(old_image), new.captions.get(new_image)
    if before is not None and after is not None and before.sha256 == after.sha256:
        return None
    old_text, new_text = old.caption_text(old_image) or "", new.caption_text(new_image) or ""
    if old_text == new_text:
        return None
    marked, removed, added = word_diff(old_text, new_text)
    return CaptionChange(new_image, old_text, new_text, marked, removed, added)


def _batch_counts(diff: VersionDiff, old: VersionFiles, new: VersionFiles) -> list[BatchCount]:
    before = Counter(origin(r)[0] for r in old.images)
    after = Counter(origin(r)[0] for r in new.images)
    added = Counter(e.batch for e in diff.added)
    removed = Counter(e.batch for e in diff.removed)
    replaced = Counter(p.batch for p in diff.replaced)
    return [
        BatchCount(b, before[b], after[b], added[b], removed[b], replaced[b]) for b in sorted(set(before) | set(after))
    ]


def diff_files(old: VersionFiles, new: VersionFiles) -> VersionDiff:
    """The changes from `old` to `new` (the module doc says how images are paired)."""
    diff = VersionDiff(
        old=old.version,
        new=new.version,
        old_manifest_root=old.info.manifest_root,
        new_manifest_root=new.info.manifest_root,
    )
    pairs = _match(old.images, new.images)
    paired_old, paired_new = {o.path for o, _ in pairs}, {n.path for _, n in pairs}
    diff.removed = [_entry(r) for r in old.images if r.path not in paired_old]
    diff.added = [_entry(r) for r in new.images if r.path not in paired_new]
    diff.captions_compared = old.info.captions_complete and new.info.captions_complete
    for before, after in sorted(pairs, key=lambda pair: pair[1].path):
        if before.sha256 != after.sha256:
            diff.replaced.append(_pair(before, after))
        elif before.path != after.path:
            diff.moved.append(_pair(before, after))
        else:
            diff.unchanged += 1
        if diff.captions_compared and (change := _caption_change(old, new, before.path, after.path)):
            diff.captions_changed.append(change)
    diff.batches = _batch_counts(diff, old, new)
    diff.spec_changes = spec_changes(old.info.spec, new.info.spec)
    return diff


def diff_versions(root: DataRoot, old: str, new: str) -> VersionDiff:
    """`lora-pipeline diff OLD NEW`: both versions must be built."""
    return diff_files(load_version(root, old), load_version(root, new))
