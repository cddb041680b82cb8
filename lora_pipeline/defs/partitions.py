"""Partitions (docs/contract.md, "Assets, checks and partitions"). All dynamic: sensors and the CLI register keys.

Training partitions are the version x recipe pairs someone asked for, one dynamic key `<version>|<recipe>` each
(`lora-pipeline train`, a recipe's `train_on`, or a key typed in the UI's Materialize dialog), not every version
times every recipe: a "missing" training partition is one asked for and not done.

Dagster (1.13) maps partitions between two dynamic partitions definitions only with its built-in mappings, none
of which follows data (a custom `PartitionMapping` is deprecated and is not sent to the webserver or the daemon,
which fall back to "every partition"). The edges from `source_batch` to `dataset_snapshot` and from
`dataset_report` to `lora_epochs` therefore map no partition (`NO_PARTITION_LINKS`) rather than every one: the
asset graph keeps the edge, and which batches a version took and which version a training run trains on are on
the partition pages (defs/lineage_pages.py) and in the automation's own conditions (defs/automation.py).
"""

import dagster as dg

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.paths import DataRoot

source_batches = dg.DynamicPartitionsDefinition(name="source_batches")
dataset_versions = dg.DynamicPartitionsDefinition(name="dataset_versions")
recipes = dg.DynamicPartitionsDefinition(name="recipes")  # the recipes the sensors have seen; no asset uses it
training_runs = dg.DynamicPartitionsDefinition(name="training_runs")  # "<version>|<recipe>", pairs asked for
SEPARATOR = "|"
NO_PARTITION_LINKS = dg.SpecificPartitionsPartitionMapping([])


def training_key(version: str, recipe: str) -> str:
    return f"{version}{SEPARATOR}{recipe}"


def split_training_key(key: str) -> tuple[str, str]:
    """(version, recipe) of a training partition key; UserError for a key typed without both."""
    version, sep, recipe = key.partition(SEPARATOR)
    if not (sep and version and recipe and SEPARATOR not in recipe):
        raise UserError(f"training partition '{key}' is not '<dataset version>{SEPARATOR}<recipe>'")
    return version, recipe


def train_on_keys(root: DataRoot, versions: list[str], recipe_names: list[str]) -> list[str]:
    """The training keys of the pairs among versions x recipes whose recipe's `train_on` names the version's
    family. A recipe that does not load asks for nothing (spec_sensor warns about it)."""
    from lora_pipeline.core.training.recipe import load_recipe

    keys = []
    for name in recipe_names:
        try:
            automation = load_recipe(root.recipe_file(name)).automation
        except UserError:
            continue
        keys += [training_key(v, name) for v in versions if automation.trains_on(v)]
    return keys


def asked_by_train_on(
    instance: dg.DagsterInstance, root: DataRoot, new_versions: list[str], new_recipes: list[str]
) -> list[str]:
    """The training keys `train_on` asks for that the instance does not know yet: each new version with every
    recipe that trains on its family, each new recipe with every known version of its families."""
    assert dataset_versions.name is not None
    keys = train_on_keys(root, new_versions, root.recipe_names()) if new_versions else []
    if new_recipes:  # every known version: a new recipe is rare, and asks about the whole history once
        known = [v for v in instance.get_dynamic_partitions(dataset_versions.name) if v not in new_versions]
        keys += train_on_keys(root, known, new_recipes)
    return unknown_keys_of(instance, training_runs, keys)


def unknown_keys(
    instance: dg.DagsterInstance, partitions: dg.DynamicPartitionsDefinition, keys: list[str]
) -> list[str]:
    """The keys (in order, without repeats) that the instance does not know yet."""
    assert partitions.name is not None
    known = set(instance.get_dynamic_partitions(partitions.name))
    return [k for k in dict.fromkeys(keys) if k not in known]


FEW_KEYS = 32  # up to this many keys are looked up one by one; more, against one listing of the partitions


def unknown_keys_of(
    instance: dg.DagsterInstance, partitions: dg.DynamicPartitionsDefinition, keys: list[str]
) -> list[str]:
    """`unknown_keys`, at a cost proportional to the keys asked about while they are few (the sensors' ticks):
    a lookup per key instead of reading every partition of a year's history."""
    assert partitions.name is not None
    keys = list(dict.fromkeys(keys))
    if len(keys) > FEW_KEYS:
        return unknown_keys(instance, partitions, keys)
    return [k for k in keys if not instance.has_dynamic_partition(partitions.name, k)]


def register(instance: dg.DagsterInstance, partitions: dg.DynamicPartitionsDefinition, keys: list[str]) -> list[str]:
    """Add the keys not yet known; return those that this call added.

    Idempotent when processes race (two builds of one new version at the same moment): a key another process
    added between the look and the insert fails the insert on the storage's unique constraint; the keys still
    unknown are then added again. The same failure with no key added meanwhile is not a race and propagates.
    """
    from sqlalchemy.exc import IntegrityError

    assert partitions.name is not None
    new = unknown_keys(instance, partitions, keys)
    while new:
        try:
            instance.add_dynamic_partitions(partitions.name, new)
            break
        except IntegrityError:
            still = unknown_keys(instance, partitions, new)
            if still == new:
                raise
            new = still
    return new
