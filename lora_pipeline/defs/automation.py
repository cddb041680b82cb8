"""Training follows the data: Dagster's declarative automation trains and evaluates new dataset versions.

A recipe's `train_on` names dataset families (names or globs); the sensors register a training partition
`<version>|<recipe>` for each new version of such a family (and each version of the families a new recipe names).
When it is new, the version has been built and its blocking checks passed, `lora_epochs` is requested for it, and
once it has materialized, `evaluation_grid`. A requested training whose run failed after saving epochs (killed) is
requested once more, and resumes. `training_automation_sensor` (on by default, evaluated in the code server
because two conditions here read the data root) evaluates the conditions; pool `gpu` (limit 1, dagster.yaml)
keeps one training at a time. A version whose blocking checks failed is never requested: the condition
"dataset_report's blocking checks passed" is false for it in the asset's Automation tab, and the failed check
on `dataset_report` says why.
"""

from __future__ import annotations

import warnings

import dagster as dg

from lora_pipeline.core.datasets.checks.gate import require_passed_report
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.paths import DataRoot
from lora_pipeline.core.training.recipe import load_recipe
from lora_pipeline.defs.partitions import SEPARATOR
from lora_pipeline.defs.resources import DATA_ROOT


def _matching(context: dg.AutomationContext, keep) -> dg.AutomationResult:
    """The candidate partitions `<version>|<recipe>` for which `keep(root, version, recipe)` is true."""
    root = DATA_ROOT.data  # the assets' data root
    kept = set()
    for key in context.candidate_subset.expensively_compute_partition_keys():
        version, _, recipe = str(key).partition(SEPARATOR)
        if keep(root, version, recipe):
            kept.add(key)
    return dg.AutomationResult(context, context.candidate_subset.compute_intersection_with_partition_keys(kept))


def _recipe_trains_on(root: DataRoot, version: str, recipe: str) -> bool:
    try:
        return load_recipe(root.recipe_file(recipe)).automation.trains_on(version)
    except UserError:  # a recipe that does not load trains nothing (spec_sensor warns about it)
        return False


def _passed_gate(root: DataRoot, version: str, _recipe: str) -> bool:
    try:
        require_passed_report(root, version)
    except (UserError, OSError):
        return False
    return True


class _PartitionPredicate(dg.AutomationCondition):
    """A condition true for the candidate `<version>|<recipe>` partitions that `keep` accepts; subclasses set
    `keep`, `label` and `explanation` (the name and the description shown in the asset's Automation tab)."""

    label: str
    explanation: str

    @property
    def requires_cursor(self) -> bool:
        return False

    @property
    def name(self) -> str:
        return type(self).label

    @property
    def description(self) -> str:
        return type(self).explanation

    def evaluate(self, context: dg.AutomationContext) -> dg.AutomationResult:
        return _matching(context, type(self).keep)


class RecipeTrainsOnFamily(_PartitionPredicate):
    """True for `<version>|<recipe>` when the recipe's `train_on` names the version's family."""

    keep = staticmethod(_recipe_trains_on)
    label = "recipe_trains_on_family"
    explanation = "the recipe's train_on names the dataset version's family"


class BlockingChecksPassed(_PartitionPredicate):
    """True for `<version>|<recipe>` when the version is sealed and its report has no blocking problem: the
    same gate `lora_epochs` applies before it trains (core/datasets/checks/gate.py)."""

    keep = staticmethod(_passed_gate)
    label = "dataset_report_blocking_checks_passed"
    explanation = "dataset_report's blocking checks passed (sealed version, report without errors)"


def _left_epochs(root: DataRoot, version: str, recipe: str) -> bool:
    from lora_pipeline.core.training.run.checkpoint import state_path  # torch: not at the code location's load

    return state_path(root.loras(version, recipe)).is_file()


class LeftEpochsToResume(_PartitionPredicate):
    """True for `<version>|<recipe>` when a training saved epochs it can resume from (its `.resume/` state)."""

    keep = staticmethod(_left_epochs)
    label = "left_epochs_to_resume"
    explanation = "a stopped training left saved epochs to resume from"


_ready = (
    ~dg.AutomationCondition.any_deps_missing()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
)

# Train a version x recipe once: when it is missing and newly so (registered for a new version or recipe; it
# stays so until requested, so a version registered before it is built is trained once it is), the recipe trains
# on the family, and the blocking checks passed. Its dataset_report maps to no partition (partitions.py): the
# gate condition reads the version's report itself. A training that was stopped part-way (its run killed, its
# machine gone) is asked for once more when its run is seen to have failed, if it saved epochs to resume from;
# one that failed before any epoch would fail the same way again. The custom conditions come last, so they only
# look at the few partitions the built-in ones let through.
_stopped_part_way = dg.AutomationCondition.execution_failed().newly_true() & LeftEpochsToResume()
train_on_condition = (
    dg.AutomationCondition.missing()
    & (dg.AutomationCondition.newly_missing() | _stopped_part_way).since_last_handled()
    & _ready
    & RecipeTrainsOnFamily()
    & BlockingChecksPassed()
).with_label("train_on: a new version of a family the recipe trains on, blocking checks passed")

# Evaluate what the automation trained, when its epochs (re)materialize.
evaluate_on_condition = (
    (dg.AutomationCondition.newly_missing() | dg.AutomationCondition.any_deps_updated()).since_last_handled()
    & _ready
    & RecipeTrainsOnFamily()
).with_label("train_on: evaluate new epochs of a recipe that trains on the family")

with warnings.catch_warnings():  # use_user_code_server is a beta parameter, used knowingly (custom conditions)
    warnings.simplefilter("ignore", dg.BetaWarning)
    training_automation_sensor = dg.AutomationConditionSensorDefinition(
        "training_automation_sensor",
        target=dg.AssetSelection.assets("lora_epochs", "evaluation_grid"),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=15,
        use_user_code_server=True,
        emit_backfills=False,
        description="Declarative automation of lora_epochs and evaluation_grid for the recipes' train_on families.",
    )
