"""Dataset specs: `data/specs/<version>.yaml`, parsed and checked (DESIGN.md, "Dataset spec")."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import sha256_json
from lora_pipeline.core.yamlfile import load_yaml_mapping, reject_unknown

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# A batch source may be a glob over batch names ("turntable-renders-*"): it takes every ready batch
# that matches when the version is built, and lets `auto_rebuild` make a new version when one lands.
BATCH_PATTERN_RE = re.compile(r"^[A-Za-z0-9*?\[][A-Za-z0-9._*?\[\]!-]*$")
TRIGGER_RE = re.compile(r"^\S+$")
CaptionFrom = Literal["sidecar", "table", "attributes"]


@dataclass(frozen=True)
class SourceRef:
    """One entry of `sources:`: a batch (with optional globs) or an earlier dataset version."""

    batch: str | None = None
    dataset: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return "batch" if self.batch else "dataset"

    @property
    def name(self) -> str:
        return self.batch or self.dataset or ""

    @property
    def is_pattern(self) -> bool:
        return bool(self.batch) and any(c in self.batch for c in "*?[")


@dataclass(frozen=True)
class CaptionSpec:
    source: CaptionFrom = "sidecar"  # the YAML key is `from`
    table: str | None = None  # "<batch>/<path>" or a path inside the single named batch
    template: str | None = None
    vocabulary: tuple[str, ...] = ()
    banned: tuple[str, ...] = ()
    prepend_trigger: bool = False
    shared_caption_limit: int = 3


@dataclass(frozen=True)
class ChecksSpec:
    min_side: int = 512
    max_aspect: float = 2.5
    near_duplicates: Literal["warn", "error", "ignore"] = "warn"
    max_pixels: int = 64_000_000


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    trigger: str
    repeats: int
    sources: tuple[SourceRef, ...]
    intent: str = ""
    merge: bool = False
    auto_rebuild: bool = False
    captions: CaptionSpec = field(default_factory=CaptionSpec)
    checks: ChecksSpec = field(default_factory=ChecksSpec)

    @property
    def class_folder(self) -> str:
        """kohya's `<repeats>_<trigger>` image folder name."""
        return f"{self.repeats}_{self.trigger}"

    def resolved(self) -> dict[str, Any]:
        """The spec as plain data with every default filled in (what snapshot.json stores)."""
        data = asdict(self)
        data["captions"]["from"] = data["captions"].pop("source")
        return data

    @property
    def sha256(self) -> str:
        return sha256_json(self.resolved())


SPEC_FIELDS = {"name", "intent", "trigger", "repeats", "sources", "merge", "auto_rebuild", "captions", "checks"}
SOURCE_FIELDS = {"batch", "dataset", "include", "exclude"}
CAPTION_FIELDS = {"from", "table", "template", "vocabulary", "banned", "prepend_trigger", "shared_caption_limit"}
CHECK_FIELDS = {"min_side", "max_aspect", "near_duplicates", "max_pixels"}


def _str_list(value: Any, what: str, path: Path) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{what} must be a list of strings", path)
    return tuple(value)


def parse_spec(data: dict[str, Any], path: Path) -> DatasetSpec:
    reject_unknown(data, SPEC_FIELDS, path)
    for required in ("name", "trigger", "repeats", "sources"):
        if required not in data:
            raise UserError(f"missing required field '{required}'", path)
    name = str(data["name"])
    if name != path.stem:
        raise UserError(f"name '{name}' must equal the file stem '{path.stem}'", path)
    if not NAME_RE.match(name):
        raise UserError(f"name '{name}' may only use letters, digits, '.', '_' and '-'", path)
    trigger = str(data["trigger"])
    if not TRIGGER_RE.match(trigger) or "," in trigger:
        raise UserError(f"trigger '{trigger}' must be one token without spaces or commas", path)
    repeats = data["repeats"]
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise UserError("repeats must be a positive integer", path)
    raw_sources = data["sources"]
    if not isinstance(raw_sources, list) or not raw_sources:
        raise UserError("sources must be a non-empty list", path)
    sources = []
    for entry in raw_sources:
        if not isinstance(entry, dict):
            raise UserError("each source must be a mapping with 'batch' or 'dataset'", path)
        reject_unknown(entry, SOURCE_FIELDS, path, "in source: ")
        if ("batch" in entry) == ("dataset" in entry):
            raise UserError("each source needs exactly one of 'batch' or 'dataset'", path)
        ref = SourceRef(
            batch=str(entry["batch"]) if "batch" in entry else None,
            dataset=str(entry["dataset"]) if "dataset" in entry else None,
            include=_str_list(entry.get("include"), "include", path),
            exclude=_str_list(entry.get("exclude"), "exclude", path),
        )
        if not (BATCH_PATTERN_RE if ref.batch else NAME_RE).match(ref.name):
            raise UserError(f"source name '{ref.name}' is not a valid folder name", path)
        sources.append(ref)
    captions = _parse_captions(data.get("captions") or {}, path)
    checks = _parse_checks(data.get("checks") or {}, path)
    return DatasetSpec(
        name=name,
        intent=str(data.get("intent") or ""),
        trigger=trigger,
        repeats=repeats,
        sources=tuple(sources),
        merge=bool(data.get("merge", False)),
        auto_rebuild=bool(data.get("auto_rebuild", False)),
        captions=captions,
        checks=checks,
    )


def _parse_captions(data: dict[str, Any], path: Path) -> CaptionSpec:
    if not isinstance(data, dict):
        raise UserError("captions must be a mapping", path)
    reject_unknown(data, CAPTION_FIELDS, path, "in captions: ")
    source = data.get("from", "sidecar")
    if source not in ("sidecar", "table", "attributes"):
        raise UserError(f"captions.from must be sidecar, table or attributes, not '{source}'", path)
    if source in ("table", "attributes") and not data.get("table"):
        raise UserError(f"captions.from: {source} needs captions.table", path)
    if source == "attributes" and not data.get("template"):
        raise UserError("captions.from: attributes needs captions.template", path)
    return CaptionSpec(
        source=source,
        table=data.get("table"),
        template=data.get("template"),
        vocabulary=_str_list(data.get("vocabulary"), "captions.vocabulary", path),
        banned=_str_list(data.get("banned"), "captions.banned", path),
        prepend_trigger=bool(data.get("prepend_trigger", False)),
        shared_caption_limit=int(data.get("shared_caption_limit", 3)),
    )


def _parse_checks(data: dict[str, Any], path: Path) -> ChecksSpec:
    if not isinstance(data, dict):
        raise UserError("checks must be a mapping", path)
    reject_unknown(data, CHECK_FIELDS, path, "in checks: ")
    near = data.get("near_duplicates", "warn")
    if near not in ("warn", "error", "ignore"):
        raise UserError("checks.near_duplicates must be warn, error or ignore", path)
    try:
        return ChecksSpec(
            min_side=int(data.get("min_side", 512)),
            max_aspect=float(data.get("max_aspect", 2.5)),
            near_duplicates=near,
            max_pixels=int(data.get("max_pixels", 64_000_000)),
        )
    except (TypeError, ValueError):
        raise UserError("checks.min_side, max_aspect and max_pixels must be numbers", path) from None


def load_spec(path: Path) -> DatasetSpec:
    return parse_spec(load_yaml_mapping(path), path)
