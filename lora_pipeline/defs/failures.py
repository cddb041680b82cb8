"""A user's mistake as Dagster's structured step failure, so no one has to read it out of an error's text.

A UserError raised inside an asset or op becomes a `dg.Failure` whose description is the error's one line
and whose metadata says it was the user's input: the UI shows that line instead of a traceback, and
`runs/jobs.py` (the CLI) turns it back into a UserError from the failure's metadata.
"""

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import dagster as dg

from lora_pipeline.core.errors import UserError

USER_ERROR = "user_error"  # metadata key of a step failure that carries a UserError's line
P = ParamSpec("P")
R = TypeVar("R")


def fails_on_user_error(step: Callable[P, R]) -> Callable[P, R]:
    """Decorate an asset's or op's function (beneath `@dg.asset` / `@dg.op`): a UserError fails the step
    with the error's line as a structured failure; any other exception keeps its traceback."""

    @functools.wraps(step)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return step(*args, **kwargs)
        except UserError as exc:
            metadata = {USER_ERROR: True, "path": exc.path or ""}
            raise dg.Failure(description=str(exc), metadata=metadata, allow_retries=False) from exc

    return run
