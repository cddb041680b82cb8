"""Dataset specs: `data/specs/<version>.yaml`, parsed and checked by a typed schema.

docs/fields.md lists every field; it is generated from these classes (`make docs`).
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, WithJsonSchema, model_validator
from pydantic.dataclasses import dataclass

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import sha256_json
from lora_pipeline.core.names import MAX_NAME_LENGTH
from lora_pipeline.core.schema import (
    ADDED_LATER,
    CONFIG,
    Bool,
    Float,
    Int,
    Name,
    Text,
    TextList,
    hashed_values,
    non_empty,
    validate,
)
from lora_pipeline.core.yamlfile import load_yaml_mapping

# A batch source may be a glob over batch names ("turntable-renders-*"): it takes every ready batch
# that matches when the version is built, and lets `auto_rebuild` make a new version when one lands.
BATCH_PATTERN_RE = re.compile(r"[A-Za-z0-9*?\[][A-Za-z0-9._*?\[\]!-]*")
CaptionFrom = Literal["sidecar", "table", "attributes"]
MaskMode = Literal["none", "file", "alpha"]
Role = Literal["training", "regularisation"]
# Under which rights a batch's images may be used for training (sources/rights.py); a batch with no record is unknown.
Rights = Literal["owned", "licensed", "public-domain", "unknown"]


def name_glob(what: str, first_named: str = "") -> Any:
    """The type of a text that is a `what` name ("batch", "family") or a glob over such names: one path segment of
    name characters and glob characters, at most MAX_NAME_LENGTH long. `first_named` is how the error names the
    thing (default `what`)."""

    def check(value: str) -> str:
        if len(value) > MAX_NAME_LENGTH or not BATCH_PATTERN_RE.fullmatch(value):
            raise ValueError(f"{value[:40]!r} is not a {first_named or what} name or a glob over {what} names")
        return value

    return Annotated[Text, AfterValidator(check), WithJsonSchema({"type": "string", "format": f"{what} name or glob"})]


BatchPattern = name_glob("batch")


@dataclass(frozen=True, config=CONFIG)
class SourceRef:
    """One entry of `sources:`: exactly one of `batch` (a batch id or a glob over batch ids) or `dataset` (an
    earlier version). A single text is accepted where a list of globs is expected."""

    batch: BatchPattern | None = Field(None, description="a ready batch id, or a glob over batch ids (`curated-*`)")
    dataset: Name | None = Field(None, description="an earlier dataset version whose images are copied again")
    include: TextList = Field((), description="globs over paths inside the batch; only matching files are taken")
    exclude: TextList = Field((), description="globs over paths inside the batch that are left out")
    masks: MaskMode = Field(
        "none", description="loss masks of a batch's images: `file` (`<stem>.mask.png` beside each image), "
        "`alpha` (the image's alpha channel) or none", json_schema_extra=ADDED_LATER,
    )
    role: Role = Field(
        "training", description="`regularisation`: kohya class images, copied to `reg/<repeats>_<class_tokens>/`",
        json_schema_extra=ADDED_LATER,
    )
    class_tokens: Name | None = Field(
        None, description="for regularisation: the class (folder name and the caption of every class image)",
        json_schema_extra=ADDED_LATER,
    )
    repeats: Int | None = Field(
        None, ge=1, le=10_000, description="for regularisation: kohya repeats of the class images (default 1)",
        json_schema_extra=ADDED_LATER,
    )

    @model_validator(mode="after")
    def _one_kind(self) -> SourceRef:
        if (self.batch is None) == (self.dataset is None):
            raise ValueError("each source needs exactly one of 'batch' or 'dataset'")
        if self.role == "regularisation":
            if not self.batch or not self.class_tokens:
                raise ValueError("a regularisation source needs 'batch' and 'class_tokens'")
            if self.masks != "none":
                raise ValueError("regularisation images take no masks")
        elif self.class_tokens is not None or self.repeats is not None:
            raise ValueError("'class_tokens' and 'repeats' belong to a source with role: regularisation")
        if self.dataset and self.masks != "none":
            raise ValueError("'masks' is for batch sources (a dataset source brings its own masks)")
        return self

    @property
    def reg_folder(self) -> str:
        """kohya's `reg/<repeats>_<class>` folder of a regularisation source."""
        return f"reg/{self.repeats or 1}_{self.class_tokens}"

    @property
    def kind(self) -> str:
        return "batch" if self.batch else "dataset"

    @property
    def name(self) -> str:
        return self.batch or self.dataset or ""

    @property
    def is_pattern(self) -> bool:
        return bool(self.batch) and any(c in self.batch for c in "*?[")


@dataclass(frozen=True, config=CONFIG)
class CaptionSpec:
    """Where captions come from and what they may say. `table` is required when `from` is table or attributes,
    `template` when it is attributes. A single text is accepted where a list is expected."""

    source: CaptionFrom = Field(
        "sidecar", alias="from",
        description="sidecar (`<stem>.txt` beside the image), table (CSV/JSONL with `file`, `caption`) or "
        "attributes (CSV/JSONL columns rendered with `template`)",
    )
    table: Text | None = Field(
        None, description="for table/attributes: `<batch>/<path>`, or a path inside the spec's only batch"
    )
    template: Text | None = Field(
        None, description="for attributes: str.format placeholders naming columns; `{trigger}` is the trigger"
    )
    vocabulary: TextList = Field((), description="allowed tags; when given, every caption word must come from them")
    banned: TextList = Field((), description="words no caption may contain (category words)")
    prepend_trigger: Bool = Field(False, description="put the trigger first instead of failing the lint")
    shared_caption_limit: Int = Field(
        3, ge=1, description="a caption used by more images than this is reported (`shared_caption`)"
    )

    @model_validator(mode="after")
    def _needs_table(self) -> CaptionSpec:
        if self.source in ("table", "attributes") and not self.table:
            raise ValueError(f"'table' is required when 'from' is {self.source}")
        if self.source == "attributes" and not self.template:
            raise ValueError("'template' is required when 'from' is attributes")
        return self


@dataclass(frozen=True, config=CONFIG)
class ChecksSpec:
    """Limits of the dataset checks; images outside them are errors that block training."""

    min_side: Int = Field(512, ge=1, le=100_000, description="images with a shorter side are an error (px)")
    max_aspect: Float = Field(2.5, ge=1.0, le=100.0, description="long side / short side above this is an error")
    near_duplicates: Literal["warn", "error", "ignore"] = Field(
        "warn", description="severity of near-duplicate images (exact duplicates are always reported)"
    )
    max_pixels: Int = Field(
        64_000_000, ge=1, le=1_000_000_000, description="images with more pixels are refused (decompression bombs)"
    )


@dataclass(frozen=True, config=CONFIG)
class DatasetSpec:
    """One dataset version: `name` equals the file stem."""

    name: Name = Field(description="the dataset version; must equal the file stem")
    trigger: Name = Field(
        description="the trigger token: first token of every caption and part of the image folder "
        "`img/<repeats>_<trigger>/`, so a name (no spaces or commas)"
    )
    repeats: Int = Field(ge=1, le=10_000, description="kohya repeats: how often each image is seen per epoch")
    sources: Annotated[tuple[SourceRef, ...], AfterValidator(non_empty)] = Field(
        description="where the images come from (a non-empty list)"
    )
    intent: Text = Field("", description="one line saying why this version exists")
    merge: Bool = Field(False, description="true is required to reuse a dataset of another family")
    auto_rebuild: Bool = Field(
        False, description="with a glob batch source: a matching new batch yields a new version spec"
    )
    rebuilt_from: Name | None = Field(
        None, description="the built version of the same family this one was rebuilt from (auto-rebuild writes it); "
        "snapshot.json records it first among the version's `parents`", json_schema_extra=ADDED_LATER,
    )
    flip_aug: Bool = Field(
        False, description="kohya's dataset-config flip_aug: every run on this version mirrors images left-right "
        "(chance 1/2 per step); the report warns about captions that mention text or logos",
        json_schema_extra=ADDED_LATER,
    )
    allowed_rights: tuple[Rights, ...] = Field(
        (), description="the rights a version's images may have, e.g. `[owned, licensed, public-domain]`; an "
        "image whose batch has other rights (`unknown`: no record) is a blocking error (`rights_not_allowed`). "
        "Empty: no limit",
        json_schema_extra=ADDED_LATER,
    )
    captions: CaptionSpec = Field(default_factory=CaptionSpec, description="caption source and rules (below)")
    checks: ChecksSpec = Field(default_factory=ChecksSpec, description="limits of the dataset checks (below)")

    @property
    def class_folder(self) -> str:
        """kohya's `<repeats>_<trigger>` image folder name."""
        return f"{self.repeats}_{self.trigger}"

    def resolved(self) -> dict[str, Any]:
        """The spec as plain data with every default filled in (what snapshot.json stores), except the fields
        added later (ADDED_LATER) while they hold their default: specs written before them keep their hash and
        their built versions stay valid."""
        data = asdict(self)
        data["captions"]["from"] = data["captions"].pop("source")
        data["sources"] = [hashed_values(SourceRef, ref) for ref in data["sources"]]
        return hashed_values(DatasetSpec, data)

    @property
    def sha256(self) -> str:
        return sha256_json(self.resolved())


def parse_spec(data: dict[str, Any], path: Path) -> DatasetSpec:
    spec = validate(DatasetSpec, data, path)
    if spec.name != path.stem:
        raise UserError(f"name: '{spec.name}' must equal the file stem '{path.stem}'", path)
    return spec


def load_spec(path: Path) -> DatasetSpec:
    return parse_spec(load_yaml_mapping(path), path)
