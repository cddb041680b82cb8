"""Where everything lives under the data root, and the names of the files in a snapshot (docs/contract.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.names import is_name, require_name
from lora_pipeline.core.settings import settings

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_MARKER = "_READY"
RIGHTS_FILE = "_RIGHTS.yaml"  # beside _READY: the rights of a batch that lands by sensor (sources/rights.py)
# A folder whose name ends so is still being copied in (safe arrival: core/datasets/sources/arrival.py).
IN_TRANSIT_SUFFIXES = (".tmp", ".part", ".partial")


def require_new_batch_id(batch: str) -> None:
    """A name for a batch this product writes (intake, caption import): a valid name that does not end like a copy
    still in transit, which would never become a batch."""
    require_name(batch, "batch id")
    if batch.lower().endswith(IN_TRANSIT_SUFFIXES):
        raise UserError(f"batch id '{batch}' ends like a copy still in transit ({', '.join(IN_TRANSIT_SUFFIXES)})")
# The files of datasets/<version>/ besides its images and captions.
MANIFEST = "manifest.jsonl"
SNAPSHOT = "snapshot.json"
CAPTION_CHECK = "captions.json"  # caption_set's problems, lint and tag frequencies, read by dataset_report
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
CONTACT_SHEET = "contact_sheet.png"
REVIEW_PAGE = "review.html"  # the captions for a person to review (core/datasets/captions/review.py)
SEAL = "seal.json"  # written last: the version is whole (see datasets/snapshot/seal.py)
MLFLOW_DB = "mlflow.db"


def external_mlflow_uri() -> str | None:
    """The tracking URI of `$LORA_PIPELINE_MLFLOW_URI` (an MLflow server, e.g. on Postgres), or None."""
    return settings().mlflow_uri


def mlflow_tracking_uri(mlflow_dir: Path) -> str:
    """`$LORA_PIPELINE_MLFLOW_URI` when set, else the SQLite store in `mlflow_dir` (as `make mlflow-ui` opens it)."""
    return external_mlflow_uri() or f"sqlite:///{mlflow_dir.resolve() / MLFLOW_DB}"


@dataclass(frozen=True)
class DataRoot:
    """Typed accessors for the data layout; one instance per data root.

    Every accessor that puts a name into a path checks it is one safe path segment (core/names.py),
    so a batch id, version or recipe name can never select a folder outside its place. The listings
    return valid names only; `misnamed_entries` says what they left out.
    """

    root: Path

    @classmethod
    def from_env(cls) -> DataRoot:
        """The data root of the settings (`$LORA_PIPELINE_DATA`), else `./data` of the repository."""
        return cls(settings().data or REPO_ROOT / "data")

    @property
    def sources(self) -> Path:
        return self.root / "sources"

    @property
    def specs(self) -> Path:
        return self.root / "specs"

    @property
    def recipes(self) -> Path:
        return self.root / "recipes"

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def loras_root(self) -> Path:
        return self.root / "loras"

    @property
    def evals_root(self) -> Path:
        return self.root / "evals"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def mlflow(self) -> Path:
        return self.root / "mlflow"

    @property
    def governance(self) -> Path:
        """Append-only records of decisions about sources (rights, retirements); never under sources/."""
        return self.root / "governance"

    @property
    def cache(self) -> Path:
        """Derived data that can always be rebuilt (hash caches); never under sources/."""
        return self.root / ".cache"

    def batch(self, batch_id: str) -> Path:
        return self.sources / require_name(batch_id, "batch id")

    def spec_file(self, version: str) -> Path:
        return self.specs / f"{require_name(version, 'dataset version')}.yaml"

    def recipe_file(self, recipe: str) -> Path:
        return self.recipes / f"{require_name(recipe, 'recipe')}.yaml"

    def dataset(self, version: str) -> Path:
        return self.datasets / require_name(version, "dataset version")

    def loras(self, version: str, recipe: str) -> Path:
        return self.loras_root / require_name(version, "dataset version") / require_name(recipe, "recipe")

    def evals(self, version: str, recipe: str) -> Path:
        return self.evals_root / require_name(version, "dataset version") / require_name(recipe, "recipe")

    def ready_folder(self, entry: str) -> bool:
        """Whether `sources/<entry>` is a folder (not a link) holding the `_READY` marker, whatever its name."""
        p = self.sources / entry
        return p.is_dir() and not p.is_symlink() and (p / READY_MARKER).is_file()

    @staticmethod
    def batch_named(entry: str) -> bool:
        """Whether a ready folder's name makes it a batch: a valid name, not a copy still in transit."""
        return is_name(entry) and not entry.lower().endswith(IN_TRANSIT_SUFFIXES)

    def _ready_batch_folders(self) -> list[Path]:
        if not self.sources.is_dir():
            return []
        return [p for p in self.sources.iterdir() if self.ready_folder(p.name)]

    def _yaml_files(self, folder: Path) -> list[Path]:
        return list(folder.glob("*.yaml")) if folder.is_dir() else []

    def ready_batches(self) -> list[str]:
        """Batch ids whose folder holds the `_READY` marker, sorted; a name ending in an IN_TRANSIT_SUFFIXES
        suffix is a copy still on its way in, never a batch."""
        return sorted(p.name for p in self._ready_batch_folders() if self.batch_named(p.name))

    def spec_versions(self) -> list[str]:
        return sorted(p.stem for p in self._yaml_files(self.specs) if is_name(p.stem))

    def recipe_names(self) -> list[str]:
        return sorted(p.stem for p in self._yaml_files(self.recipes) if is_name(p.stem))

    def built_versions(self) -> list[str]:
        """Versions with a `snapshot.json`, sorted; staging folders (hidden names) are not versions."""
        if not self.datasets.is_dir():
            return []
        return sorted(p.parent.name for p in self.datasets.glob(f"*/{SNAPSHOT}") if is_name(p.parent.name))

    def misnamed_entries(self) -> list[Path]:
        """Ready batch folders, spec and recipe files whose names are not valid names (the listings skip them).

        Hidden entries (intake's staging folders, editor files) are not listed: they are never content.
        """
        entries = [(p, p.name) for p in self._ready_batch_folders()]
        entries += [(p, p.stem) for p in self._yaml_files(self.specs) + self._yaml_files(self.recipes)]
        return sorted(p for p, name in entries if not is_name(name) and not p.name.startswith("."))
