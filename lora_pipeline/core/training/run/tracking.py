"""MLflow tracking of LoRA training runs: SQLite store and artifacts under `<data>/mlflow/`, or the tracking
server of `$LORA_PIPELINE_MLFLOW_URI` (the cluster profile: a server on Postgres whose artifact root is a
shared folder; the store and artifact location are then the server's).

One run per training, named `<version>/<recipe>`, in the experiment "lora-pipeline" whose artifact location
is `<data>/mlflow/artifacts`. The experiment is tagged a model-training experiment (`mlflow.experimentKind`), so
the MLflow UI opens it with runs and metrics, not in its GenAI mode (traces). Runs carry the lineage as tags
(`dataset_tags`): the dataset version, its manifest root and one tag per batch its images came from,
`lora_pipeline.batch.<id>` = "1", so `search_runs(filter_string=batch_filter(id))` answers "which runs used batch
<id>" (directly or through the earlier versions the dataset copied).

Everything goes through an `MlflowClient` bound to an explicit tracking URI, so nothing depends on (or leaks
into) MLflow's process-global active run or environment.

A resumed training continues its MLflow run (the run id is in every LoRA header of the run) and logs only
the steps the run does not have yet.

MLflow creates its SQLite schema by running dozens of migrations, some of which commit as they go: a process
killed half-way used to leave a store that every later run failed on ("duplicate column name: step").
`open_store` therefore lets MLflow create the store in a temp file and renames it into place (under a lock),
so `mlflow.db` is whole or absent; a store whose schema is not MLflow's current one is reported in one line,
or replaced when it provably holds nothing (no runs, no experiment but MLflow's default). A full disk under the
store is an OSError naming it, so training stops in one line as on any other full disk.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sqlite3
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import mlflow.data
import pandas as pd
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.store.db.utils import _get_latest_schema_revision
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (
    MAX_DATASET_DIGEST_SIZE,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

from lora_pipeline.core.datasets.snapshot.manifest import IMAGE_KINDS, read_manifest, read_snapshot_info
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import canonical_json
from lora_pipeline.core.locks import exclusive_lock
from lora_pipeline.core.paths import MLFLOW_DB, external_mlflow_uri, mlflow_tracking_uri
from lora_pipeline.core.plots import line_chart
from lora_pipeline.core.training.run.background import in_background

EXPERIMENT = "lora-pipeline"
ARTIFACTS = "artifacts"
# MLflow 3's experiment type (its UI's ExperimentKind): a model-training experiment, not GenAI development
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
BATCH_TAG_PREFIX = "lora_pipeline.batch."


STORE_LOCK = f".{MLFLOW_DB}.lock"
_logger = logging.getLogger(__name__)


def open_store(mlflow_dir: Path, log: Callable[[str], None] = _logger.warning) -> str:
    """The tracking URI of `mlflow_dir/mlflow.db`, after making sure the store is whole (see the module doc);
    `$LORA_PIPELINE_MLFLOW_URI` instead when it is set (a server keeps its own store whole)."""
    if external := external_mlflow_uri():
        return external
    db = mlflow_dir / MLFLOW_DB
    mlflow_dir.mkdir(parents=True, exist_ok=True)
    if db.is_file() and _schema_revision(db) == _get_latest_schema_revision():
        return mlflow_tracking_uri(mlflow_dir)
    with exclusive_lock(mlflow_dir / STORE_LOCK):  # one creator; the others wait, then find it whole
        if db.is_file():
            revision = _schema_revision(db)
            if revision != _get_latest_schema_revision():
                _replace_unfinished_store(db, revision, log)
        if not db.is_file():
            _create_store(db)
    return mlflow_tracking_uri(mlflow_dir)


def _schema_revision(db: Path) -> str | None:
    """The store's alembic revision (None if it has none yet), read without MLflow touching the file."""
    with _read_only(db) as conn:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='alembic_version'").fetchone():
            return None
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    return row[0] if row else None


@contextmanager
def _read_only(db: Path) -> Iterator[sqlite3.Connection]:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise UserError(f"cannot open the MLflow store: {exc}", db) from None
    try:
        yield conn
    except sqlite3.DatabaseError as exc:
        raise UserError(f"not a readable MLflow store: {exc}", db) from None
    finally:
        conn.close()


def _replace_unfinished_store(db: Path, revision: str | None, log: Callable[[str], None]) -> None:
    """Remove a store whose schema is not the current one if it provably holds nothing; else a UserError."""
    with _read_only(db) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        runs = conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] if "runs" in tables else 0
        experiments = (conn.execute("SELECT COUNT(*) FROM experiments WHERE experiment_id != 0").fetchone()[0]
                       if "experiments" in tables else 0)
    found = f"schema revision {revision or 'none'}, MLflow {mlflow.__version__} needs {_get_latest_schema_revision()}"
    if runs or experiments:
        raise UserError(
            f"MLflow store has an unfinished or older schema ({found}) and holds {runs} run(s): back it up, then "
            f"run `mlflow db upgrade sqlite:///{db.resolve()}` or move it aside to start a new store", db)
    log(f"{db}: MLflow store was left half-created ({found}, no runs): replacing it with a new one")
    db.unlink()


def _create_store(db: Path) -> None:
    """Let MLflow build the schema in a temp file beside `db`, then rename it into place."""
    for stale in db.parent.glob(f".{MLFLOW_DB}.*.tmp"):  # from a creator killed before its rename (we hold the lock)
        stale.unlink()
    tmp = db.with_name(f".{MLFLOW_DB}.{os.getpid()}.tmp")
    try:
        store = SqlAlchemyStore(f"sqlite:///{tmp.resolve()}", str((db.parent / ARTIFACTS).resolve()))
        store.engine.dispose()  # every connection closed: the file is complete on disk
        os.replace(tmp, db)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _store_full(exc: BaseException) -> bool:
    """Whether SQLite said "database or disk is full" anywhere in an error's chain (MLflow wraps SQLAlchemy's
    error, which wraps sqlite3's)."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, sqlite3.OperationalError) and error.sqlite_errorcode == sqlite3.SQLITE_FULL:
            return True
        error = error.__cause__ or error.__context__
    return False


class _StoreClient:
    """An MlflowClient whose calls raise a full disk under the SQLite store as OSError(ENOSPC) naming `mlflow.db`:
    the trainer reports it in one line like every other full disk (result.py's `environment_error`)."""

    def __init__(self, client: MlflowClient, db: Path | None):
        self._client, self._db = client, db

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr) or self._db is None:
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except MlflowException as exc:
                if _store_full(exc):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self._db)) from None
                raise

        return call


def param_value(value: Any) -> str:
    """A run parameter as MLflow stores it: text (lists and mappings as canonical JSON), cut to MLflow's length
    limit."""
    structured = isinstance(value, list | tuple | dict)
    text = value if isinstance(value, str) else canonical_json(value) if structured else str(value)
    return text[:MAX_PARAM_VAL_LENGTH]


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def batch_filter(batch: str) -> str:
    """The `MlflowClient.search_runs` filter string of the runs whose dataset took images from `batch`."""
    return f"tags.`{BATCH_TAG_PREFIX}{batch}` = '1'"


def dataset_tags(snapshot_dir: Path) -> dict[str, str]:
    """The run tags of a dataset version: `dataset_version`, `manifest_root` and `lora_pipeline.batch.<id>` = "1"
    for every batch its images (and regularisation images) entered the pipeline from."""
    info = read_snapshot_info(snapshot_dir)
    rows = [r for r in read_manifest(snapshot_dir) if r.kind in IMAGE_KINDS]
    batches = sorted({b for r in rows if (b := r.origin_batch or r.source_batch)})
    return {"dataset_version": info.version, "manifest_root": info.manifest_root,
            **{BATCH_TAG_PREFIX + b: "1" for b in batches}}


def log_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    """Set the run's tags, as many log_batch calls as MLflow's per-call limit needs (a batch tag per batch)."""
    entries = [RunTag(k, str(v)) for k, v in tags.items()]
    for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=list(chunk))


class TrainingTracker:
    """MLflow bookkeeping for one training: `with tracker.run(...) as run_id:` then log steps and files."""

    def __init__(self, mlflow_dir: Path, tags: Mapping[str, str] | None = None, experiment: str = EXPERIMENT,
                 log: Callable[[str], None] = _logger.warning):
        """`tags`: the caller's run tags (Dagster run id, partition key, code commit, ...); `log` hears about a
        half-created store being replaced."""
        self.mlflow_dir = mlflow_dir
        self.tags = dict(tags or {})
        self.experiment = experiment
        store = None if external_mlflow_uri() else mlflow_dir / MLFLOW_DB
        # The store is opened (on a new data root: created, a second or two of MLflow's migrations) by a thread of
        # its own while the training reads its data and loads the model; its first use waits for it.
        self._client: Future[Any] = in_background(
            "mlflow-store", lambda: _StoreClient(MlflowClient(tracking_uri=open_store(mlflow_dir, log)), store))
        self.run_id: str | None = None
        self._last_step = 0

    @property
    def client(self) -> Any:
        """The MLflow client of the store, once it is open (its error, if it cannot be: a UserError)."""
        return self._client.result()

    def experiment_id(self) -> str:
        """The experiment's id, created if need be, and tagged a model-training experiment (an experiment made
        before that tag, or that the UI took for GenAI, gets it now)."""
        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            # A tracking server puts the experiment under its own artifact root (the cluster profile's shared folder).
            location = None if external_mlflow_uri() else str((self.mlflow_dir / ARTIFACTS).resolve())
            try:
                return self.client.create_experiment(self.experiment, artifact_location=location,
                                                     tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except MlflowException:  # created concurrently by another process
                found = self.client.get_experiment_by_name(self.experiment)
                if found is None:
                    raise
        if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id

    def _resumable(self, run_id: str | None, experiment_id: str) -> bool:
        if not run_id:
            return False
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return False
        return run.info.experiment_id == experiment_id and run.info.lifecycle_stage == "active"

    @contextmanager
    def run(
        self,
        name: str,
        *,
        params: Mapping[str, Any],
        tags: Mapping[str, str] | None = None,
        resume_run_id: str | None = None,
    ) -> Iterator[str]:
        """Start (or continue `resume_run_id`) a run; it ends FINISHED, or FAILED/KILLED with the error re-raised."""
        experiment_id = self.experiment_id()
        all_tags = {**self.tags, **(tags or {})}
        if self._resumable(resume_run_id, experiment_id):
            self.run_id = str(resume_run_id)
            self.client.update_run(self.run_id, status="RUNNING")
            history = self.client.get_metric_history(self.run_id, "loss")
            self._last_step = max((m.step for m in history), default=0)
            log_tags(self.client, self.run_id, all_tags)
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            log_tags(self.client, self.run_id, all_tags)
            self._last_step = 0
            entries = [Param(k, param_value(v)) for k, v in sorted(params.items())]
            for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id, params=list(chunk))
        try:
            yield self.run_id
        except Exception:
            self.client.set_terminated(self.run_id, "FAILED")
            raise
        except BaseException:
            self.client.set_terminated(self.run_id, "KILLED")
            raise
        self.client.set_terminated(self.run_id, "FINISHED")

    def _active(self) -> str:
        if self.run_id is None:
            raise RuntimeError("no MLflow run: use `with tracker.run(...)` first")
        return self.run_id

    def log_dataset(self, rows: Sequence[Mapping[str, Any]], *, name: str, digest: str, source: str) -> None:
        """`mlflow.log_input` of the training set (manifest rows) once per run.

        MLflow caps dataset digests at 36 characters, so the digest is the manifest root's first 36 hex
        digits; the full root is the input's `manifest_root` tag (and a run tag, from the trainer).
        """
        run_id = self._active()
        if self.client.get_run(run_id).inputs.dataset_inputs:
            return
        frame = pd.DataFrame([dict(row) for row in rows])
        with warnings.catch_warnings():  # hints that do not apply: an ambiguous local source, integer columns
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=digest[:MAX_DATASET_DIGEST_SIZE])
            entity = Dataset(**dataset.to_dict())
        entry = DatasetInput(
            entity,
            tags=[InputTag("mlflow.data.context", "training"), InputTag("manifest_root", digest)],
        )
        self.client.log_inputs(run_id, datasets=[entry])

    def log_steps(self, losses: Sequence[float], lrs: Sequence[float]) -> None:
        """Per-step `loss` and `lr` (step = global step, 1-based) for the steps not logged yet."""
        run_id = self._active()
        now = int(time.time() * 1000)
        metrics = []
        for step in range(self._last_step + 1, len(losses) + 1):
            metrics += [Metric("loss", losses[step - 1], now, step), Metric("lr", lrs[step - 1], now, step)]
        for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=list(chunk))
        self._last_step = max(self._last_step, len(losses))

    def log_values(self, values: Mapping[str, float]) -> None:
        """One-off run metrics (step 0), such as the stage timings."""
        now = int(time.time() * 1000)
        self.client.log_batch(self._active(), metrics=[Metric(k, float(v), now, 0) for k, v in values.items()])

    def log_image(self, path: Path, key: str, step: int) -> None:
        """An image under `key` at `step` (MLflow's image slider), e.g. the sample strip of an epoch."""
        from PIL import Image

        with Image.open(path) as image:
            self.client.log_image(self._active(), image.convert("RGB"), key=key, step=step)

    def log_files(self, paths: Sequence[Path], artifact_path: str | None = None, overwrite: bool = False) -> None:
        """Copy files into the run's artifacts; unless `overwrite`, those already there (a resumed run) are skipped."""
        run_id = self._active()
        present = set() if overwrite else {Path(i.path).name for i in self.client.list_artifacts(run_id, artifact_path)}
        for path in paths:
            if path.name not in present:
                self.client.log_artifact(run_id, str(path), artifact_path)


def loss_curve_png(
    losses: Sequence[float], path: Path, *, steps_per_epoch: int | None = None, title: str = "training loss"
) -> Path:
    """Per-step loss with a moving average and epoch boundaries, written atomically as a PNG."""
    steps = list(range(1, len(losses) + 1))
    with line_chart(path, title, "step") as axes:
        axes.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=0.8, label="loss")
        window = max(1, min(50, len(losses) // 10))
        if window > 1:
            averaged = [sum(losses[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1))
                        for i in range(len(losses))]
            axes.plot(steps, averaged, color="tab:blue", linewidth=1.6, label=f"moving average ({window})")
        if steps_per_epoch:
            for boundary in range(steps_per_epoch, len(losses), steps_per_epoch):
                axes.axvline(boundary + 0.5, color="0.8", linewidth=0.6)
    return path
