"""Where everything lives under the data root (see DESIGN.md, "Data root")."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_MARKER = "_READY"


def default_data_root() -> Path:
    """`$LORA_PIPELINE_DATA` if set, else `./data` of the repository."""
    env = os.environ.get("LORA_PIPELINE_DATA")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / "data"


@dataclass(frozen=True)
class DataRoot:
    """Typed accessors for the data layout; one instance per data root."""

    root: Path

    @classmethod
    def from_env(cls) -> DataRoot:
        return cls(default_data_root())

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
    def cache(self) -> Path:
        """Derived data that can always be rebuilt (hash caches); never under sources/."""
        return self.root / ".cache"

    def batch(self, batch_id: str) -> Path:
        return self.sources / batch_id

    def spec_file(self, version: str) -> Path:
        return self.specs / f"{version}.yaml"

    def recipe_file(self, recipe: str) -> Path:
        return self.recipes / f"{recipe}.yaml"

    def dataset(self, version: str) -> Path:
        return self.datasets / version

    def loras(self, version: str, recipe: str) -> Path:
        return self.loras_root / version / recipe

    def evals(self, version: str, recipe: str) -> Path:
        return self.evals_root / version / recipe

    def ready_batches(self) -> list[str]:
        """Batch ids whose folder holds the `_READY` marker, sorted."""
        if not self.sources.is_dir():
            return []
        return sorted(
            p.name
            for p in self.sources.iterdir()
            if p.is_dir() and not p.is_symlink() and (p / READY_MARKER).is_file()
        )

    def spec_versions(self) -> list[str]:
        if not self.specs.is_dir():
            return []
        return sorted(p.stem for p in self.specs.glob("*.yaml"))

    def recipe_names(self) -> list[str]:
        if not self.recipes.is_dir():
            return []
        return sorted(p.stem for p in self.recipes.glob("*.yaml"))
