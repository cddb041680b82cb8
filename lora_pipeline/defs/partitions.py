"""Partitions (docs/contract.md, "Assets, checks and partitions"). All dynamic: sensors and the CLI register keys."""

import warnings

import dagster as dg

source_batches = dg.DynamicPartitionsDefinition(name="source_batches")
dataset_versions = dg.DynamicPartitionsDefinition(name="dataset_versions")
recipes = dg.DynamicPartitionsDefinition(name="recipes")
# Multi-partition keys are "<dataset_version>|<recipe>" (dimension names in alphabetical order).
training_runs = dg.MultiPartitionsDefinition({"dataset_version": dataset_versions, "recipe": recipes})
with warnings.catch_warnings():  # a beta API, used knowingly: training partitions map to their dataset version
    warnings.simplefilter("ignore", dg.BetaWarning)
    by_dataset_version = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="dataset_version")


def training_key(version: str, recipe: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"dataset_version": version, "recipe": recipe})


def split_training_key(context: dg.AssetExecutionContext) -> tuple[str, str]:
    keys = context.partition_key.keys_by_dimension  # type: ignore[union-attr]
    return keys["dataset_version"], keys["recipe"]


def unknown_keys(
    instance: dg.DagsterInstance, partitions: dg.DynamicPartitionsDefinition, keys: list[str]
) -> list[str]:
    """The keys (in order, without repeats) that the instance does not know yet."""
    assert partitions.name is not None
    known = set(instance.get_dynamic_partitions(partitions.name))
    return [k for k in dict.fromkeys(keys) if k not in known]


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
