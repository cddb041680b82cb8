"""From a LoRA file back to everything that made it: `lora-pipeline provenance FILE`.

Only the file's header is read (plus its sha256); the rest comes from the data root. The chain is:
LoRA -> recipe -> dataset version (its manifest, re-verified) -> every input training read (training and
regularisation images, their captions and loss masks) with the source files they were copied from (re-hashed)
-> base model -> code commit -> MLflow run -> the LoRA its run started from (`from_lora`), with that LoRA's own
chain (provenance_start.py). Every link is checked against what is on disk now, and each break
becomes one plain-language finding in `status`; provenance_text.py writes the chain as text. The header is
untrusted input: its epoch is checked against the file's name, and every file is read through reads.py (no link
followed, nothing outside its folder).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from lora_pipeline.core.datasets.snapshot.manifest import ManifestRow, read_manifest, read_snapshot_info
from lora_pipeline.core.datasets.snapshot.seal import verify_version
from lora_pipeline.core.datasets.spec import load_spec
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import sha256_file
from lora_pipeline.core.lineage.provenance_start import StartLink, start_link
from lora_pipeline.core.lineage.reads import caption_text, model_folders, rehash
from lora_pipeline.core.lineage.source_flags import BatchFlags, retired_findings, version_flags
from lora_pipeline.core.models.model_hash import base_model_hash
from lora_pipeline.core.paths import SNAPSHOT, DataRoot, mlflow_tracking_uri
from lora_pipeline.core.schema import Record
from lora_pipeline.core.training.kohya.lora_file import epoch_mismatch, read_lora_metadata, tensors_match_header
from lora_pipeline.core.training.recipe import load_recipe

KEY = "lora_pipeline."
TRAINING_KEYS = (
    "ss_base_model_version", "ss_network_dim", "ss_network_alpha", "ss_epoch", "ss_num_epochs", "ss_steps",
    "ss_max_train_steps", "ss_seed", "ss_optimizer", "ss_learning_rate", "ss_lr_scheduler", "ss_resolution",
    "ss_num_train_images", "ss_training_started_at", "sshs_model_hash",
)
FileStatus = Literal["unchanged", "changed", "missing"]


def _left_out() -> Any:
    """An optional link that the JSON leaves out, rather than writing null, when there is none."""
    return Field(None, exclude_if=lambda value: value is None)


class SourceLink(Record):
    """A file a snapshot row was copied or derived from (a batch file or an earlier dataset's file), re-hashed."""

    kind: Literal["batch", "dataset"]
    name: str
    path: str
    sha256: str  # as the snapshot's manifest recorded it
    status: FileStatus


class CaptionLink(Record):
    path: str
    sha256: str
    text: str | None  # the snapshot's caption file as it reads now; null when it is gone (or is not a regular file)
    caption_source: str | None = Field(alias="from")  # the manifest row's caption_source
    source: SourceLink | None  # null for a caption written from the source's class tokens (a regularisation image)


class MaskLink(Record):
    """An image's loss mask file (kind "mask" in the manifest) and the source file it was copied from."""

    path: str
    sha256: str
    source: SourceLink


class ImageLink(Record):
    path: str
    kind: Literal["image", "reg_image"] = Field("image", exclude_if=lambda kind: kind == "image")
    sha256: str
    bytes: int
    width: int | None
    height: int | None
    source: SourceLink
    origin: SourceLink | None = _left_out()  # an image of an earlier version: the batch file it first came from
    caption: CaptionLink | None = _left_out()  # none when the manifest has no caption for the image (a finding)
    mask: MaskLink | None = _left_out()  # the loss mask file, when the image has one


class LoraLink(Record):
    path: str
    sha256: str
    epoch: str | None
    title: str | None
    training: dict[str, str]  # the header's kohya keys (TRAINING_KEYS) it has


class RecipeLink(Record):
    name: str
    sha256: str  # as the header recorded it
    file: str
    as_trained: dict[str, Any] | None = _left_out()  # the recipe as resolved when trained (from the header)
    file_status: Literal["unchanged", "changed", "missing", "invalid"]


class DatasetLink(Record):
    """The dataset version named in the header; the fields after `header_manifest_root` are given (and written)
    only when the version's snapshot.json is there."""

    version: str
    path: str
    header_manifest_root: str
    snapshot_manifest_root: str | None = None
    spec_sha256: str | None = None  # as the header recorded it
    created_at: str | None = None
    parents: list[str] | None = None
    code_version: str | None = None
    verified: bool | None = None
    files_checked: int | None = None


class BaseModelLink(Record):
    name: str | None
    source: str
    hash: str  # the U-Net hash the header recorded
    status: Literal["unchanged", "changed", "unavailable"]


class MlflowLink(Record):
    run_id: str | None
    tracking_uri: str


class ProvenanceChain(Record):
    """`trace_lora`'s chain: `provenance --json` prints `to_json_dict()`."""

    lora: LoraLink
    recipe: RecipeLink
    dataset: DatasetLink
    images: list[ImageLink]
    base_model: BaseModelLink
    code_commit: str | None
    mlflow: MlflowLink
    status: Literal["ok"] | list[str]  # "ok", or one plain-language finding per broken link
    batches: list[BatchFlags] = []  # the origin batches: rights when built and now, retirement (source_flags.py)
    from_lora: StartLink | None = _left_out()  # the LoRA its run started from, with that LoRA's own chain

    def __getitem__(self, key: str) -> Any:
        """An entry of the JSON document `provenance --json` prints (`chain["images"][0]["source"]`), for readers
        of that document's shape; the code reads the attributes."""
        return self.to_json_dict()[key]


class _Chain:
    """Collects findings and hashes each file at most once while the chain is walked."""

    def __init__(self, root: DataRoot) -> None:
        self.root = root
        self.findings: list[str] = []
        self._hashes: dict[Path, tuple[str | None, str | None]] = {}

    def rel(self, path: Path) -> str:
        """A path as the user knows it: relative to the data root when it lies inside (lexically: a link in the
        path is not followed)."""
        for root in (self.root.root.absolute(), self.root.root.resolve()):
            if path.absolute().is_relative_to(root):
                return path.absolute().relative_to(root).as_posix()
        return str(path)

    def file_status(self, path: Path, expected: str, what: str, since: str, beneath: Path) -> FileStatus:
        """"unchanged", "changed" or "missing"; a finding for the latter two. `path` is read as a regular file of
        `beneath` (a link is "missing", never followed)."""
        if path not in self._hashes:
            self._hashes[path] = rehash(path, beneath)
        actual, why = self._hashes[path]
        if actual is None:
            self.findings.append(f"{what} {self.rel(path)} {why}")
            return "missing"
        if actual != expected:
            self.findings.append(f"{what} {self.rel(path)} changed since {since}")
            return "changed"
        return "unchanged"

    def source_link(self, kind: Literal["batch", "dataset"], name: str, path: str, sha: str,
                    since: str) -> SourceLink:
        """A file a snapshot row was copied or derived from: a batch file or an earlier dataset's file."""
        where = self.root.batch(name) if kind == "batch" else self.root.dataset(name)
        what = "source file" if kind == "batch" else f"file of dataset {name}"
        status = self.file_status(where / path, sha, what, since, where)
        return SourceLink(kind=kind, name=name, path=path, sha256=sha, status=status)

    def row_source(self, row: ManifestRow, since: str) -> SourceLink | None:
        """The source file a manifest row was copied from; None for a file written from no source file."""
        if row.source_batch is not None:
            return self.source_link("batch", row.source_batch, row.source_path, row.source_sha256, since)
        if row.source_dataset is not None:
            return self.source_link("dataset", row.source_dataset, row.source_path, row.source_sha256, since)
        return None


def _recipe_link(chain: _Chain, meta: dict[str, str]) -> RecipeLink:
    name, recorded = meta.get(f"{KEY}recipe", ""), meta.get(f"{KEY}recipe_sha256", "")
    path = chain.root.recipe_file(name)
    resolved = meta.get(f"{KEY}recipe_resolved")
    if not path.is_file():
        status = "missing"
        chain.findings.append(f"recipe file {chain.rel(path)} no longer exists (the LoRA header keeps it as trained)")
    else:
        status = _compare(
            chain, lambda: load_recipe(path).sha256, recorded,
            ("invalid", f"recipe file {chain.rel(path)} no longer loads"),
            f"recipe file {chain.rel(path)} changed since training (its sha256 differs)",
        )
    return RecipeLink(name=name, sha256=recorded, file=chain.rel(path),
                      as_trained=None if resolved is None else json.loads(resolved), file_status=status)


def _compare(
    chain: _Chain, rehash: Callable[[], str], recorded: str, failure: tuple[str, str], changed: str,
) -> str:
    """Re-hash something the header recorded: "unchanged" or "changed" (with a finding when it differs).

    `failure` is (status, finding) for when it cannot be re-hashed (the UserError's line is appended).
    """
    try:
        current = rehash()
    except UserError as exc:
        chain.findings.append(f"{failure[1]}: {exc}")
        return failure[0]
    if current != recorded:
        chain.findings.append(changed)
        return "changed"
    return "unchanged"


def _dataset_link(chain: _Chain, meta: dict[str, str], version: str) -> tuple[DatasetLink, list[ImageLink]]:
    folder = chain.root.dataset(version)
    header_root = meta.get(f"{KEY}manifest_root", "")
    named = {"version": version, "path": chain.rel(folder), "header_manifest_root": header_root}
    if not (folder / SNAPSHOT).is_file():
        chain.findings.append(f"dataset version {version} is missing: {chain.rel(folder / SNAPSHOT)} does not exist")
        return DatasetLink(**named), []
    info = read_snapshot_info(folder)
    if info.manifest_root != header_root:
        chain.findings.append(
            f"header manifest root differs from the snapshot's: the LoRA was trained on {header_root[:12]}…, "
            f"{chain.rel(folder / SNAPSHOT)} now says {info.manifest_root[:12]}…"
        )
    if info.spec_sha256 is not None and info.spec_sha256 != meta.get(f"{KEY}spec_sha256"):
        chain.findings.append(f"header spec sha256 differs from the one in {chain.rel(folder / SNAPSHOT)}")
    spec_file = chain.root.spec_file(version)
    if spec_file.is_file() and info.spec_sha256 is not None:
        try:
            spec_changed = load_spec(spec_file).sha256 != info.spec_sha256
        except UserError as exc:
            chain.findings.append(f"spec file {chain.rel(spec_file)} no longer loads: {exc}")
        else:
            if spec_changed:
                chain.findings.append(f"spec file {chain.rel(spec_file)} changed since the snapshot was built")
    verified = verify_version(folder)
    if not verified.sealed:
        chain.findings.append(f"dataset version {version} is not sealed (its build did not finish): not verified")
    prefix = "snapshot no longer matches its manifest:"
    chain.findings += [f"{prefix} {chain.rel(folder / p)} content changed" for p in verified.mismatched]
    chain.findings += [f"{prefix} {chain.rel(folder / p)} is missing" for p in verified.missing]
    chain.findings += [f"{prefix} {chain.rel(folder / p)} is an extra file" for p in verified.extra]
    if verified.root_mismatch:
        chain.findings.append(f"{prefix} its rows no longer hash to the manifest_root in {SNAPSHOT}")
    link = DatasetLink(
        **named, snapshot_manifest_root=info.manifest_root, spec_sha256=meta.get(f"{KEY}spec_sha256"),
        created_at=info.created_at, parents=info.parents, code_version=info.code_version,
        verified=verified.ok, files_checked=verified.files_checked,
    )
    return link, _images(chain, folder, version)


def _images(chain: _Chain, folder: Path, version: str) -> list[ImageLink]:
    """Every image training read (training and regularisation images), with its caption and loss mask."""
    rows = read_manifest(folder)
    captions = {r.image: r for r in rows if r.kind in ("caption", "reg_caption")}
    masks = {r.image: r for r in rows if r.kind == "mask"}
    since = f"the snapshot {version}"
    images = []
    for row in sorted((r for r in rows if r.kind in ("image", "reg_image")), key=lambda r: r.path):
        source = chain.row_source(row, since)
        if source is None:
            raise UserError(f"manifest row {row.path} names no source file", folder / "manifest.jsonl")
        origin = None
        if row.source_batch is None and row.origin_batch is not None:  # copied from an earlier version
            origin = chain.source_link("batch", row.origin_batch, row.origin_path, row.origin_sha256, since)
        caption = captions.get(row.path)
        if caption is None:
            chain.findings.append(f"{chain.rel(folder / row.path)} has no caption in the manifest")
        mask = masks.get(row.path)
        mask_source = None if mask is None else chain.row_source(mask, since)
        images.append(ImageLink(
            path=row.path, kind=row.kind, sha256=row.sha256, bytes=row.bytes, width=row.width, height=row.height,
            source=source, origin=origin,
            caption=None if caption is None else _caption_link(chain, folder, caption, since),
            mask=None if mask is None or mask_source is None else MaskLink(path=mask.path, sha256=mask.sha256,
                                                                          source=mask_source),
        ))
    return images


def _caption_link(chain: _Chain, folder: Path, caption: ManifestRow, since: str) -> CaptionLink:
    text, why = caption_text(folder / caption.path, folder)
    if why is not None:
        chain.findings.append(f"caption {chain.rel(folder / caption.path)} {why}")
    return CaptionLink(
        path=caption.path, sha256=caption.sha256, text=text,
        caption_source=caption.caption_source, source=chain.row_source(caption, since),
    )


def _base_model_link(chain: _Chain, meta: dict[str, str]) -> BaseModelLink:
    source, recorded = meta.get(f"{KEY}base_model_source", ""), meta.get(f"{KEY}base_model_hash", "")
    within = model_folders(chain.root, chain.root.recipe_file(meta.get(f"{KEY}recipe", "")))
    status = _compare(
        chain, lambda: base_model_hash(source, within, cache=chain.root.cache), recorded,
        ("unavailable", "base model cannot be checked"),
        f"base model {source} changed since training (its U-Net hash differs)",
    )
    return BaseModelLink(name=meta.get(f"{KEY}base_model"), source=source, hash=recorded, status=status)


def trace_lora(root: DataRoot, lora_path: Path, _starts: int = 0) -> ProvenanceChain:
    """The provenance chain of one LoRA file, each link checked; `status` is "ok" or a list of findings.
    `_starts`: how many starting LoRAs (from_lora) were followed to reach this file."""
    meta = read_lora_metadata(lora_path)
    version = meta.get(f"{KEY}dataset_version")
    if not version:
        raise UserError("has no lora_pipeline provenance in its header (not trained by this pipeline)", lora_path)
    chain = _Chain(root)
    if (mismatch := epoch_mismatch(lora_path, meta)) is not None:
        chain.findings.append(f"LoRA file {chain.rel(lora_path)}: {mismatch}; its weights are that epoch's")
    if tensors_match_header(lora_path) is False:
        chain.findings.append(
            f"LoRA file {chain.rel(lora_path)}: its tensors changed since it was written "
            "(the sshs_model_hash in its header no longer matches)"
        )
    lora = LoraLink(
        path=str(lora_path), sha256=sha256_file(lora_path), epoch=meta.get(f"{KEY}epoch"),
        title=meta.get("modelspec.title"), training={k: meta[k] for k in TRAINING_KEYS if k in meta},
    )
    recipe = _recipe_link(chain, meta)
    dataset, images = _dataset_link(chain, meta, version)
    flags = version_flags(root, root.dataset(version)) if dataset.snapshot_manifest_root is not None else []
    chain.findings += retired_findings(version, flags)
    base = _base_model_link(chain, meta)
    start, found = start_link(root, meta, lambda path: trace_lora(root, path, _starts + 1).to_json_dict(), _starts)
    chain.findings += found
    return ProvenanceChain(
        lora=lora, recipe=recipe, dataset=dataset, images=images, base_model=base,
        code_commit=meta.get(f"{KEY}code_commit"),
        mlflow=MlflowLink(run_id=meta.get(f"{KEY}mlflow_run_id"), tracking_uri=mlflow_tracking_uri(root.mlflow)),
        status=chain.findings or "ok",
        batches=flags, **({"from_lora": start} if start is not None else {}),
    )
