"""A plain console logger: the assets' own progress lines on stdout, one per line, no engine chatter.

It replaces Dagster's default colored `console` logger for every job, so the CLI prints what the
assets say (epochs, losses, counts) while the run's full event log still goes to the instance.
"""

import logging
import sys

import dagster as dg


def _not_a_failure_event(record: logging.LogRecord) -> bool:
    """Drop the engine's step and run failure lines: the CLI reports a failed run itself, in one line
    (runs/jobs.py), and the run's event log in the instance keeps them with their errors."""
    event = (getattr(record, "dagster_meta", None) or {}).get("dagster_event")
    return event is None or not event.is_failure


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        meta = getattr(record, "dagster_meta", None) or {}
        step = meta.get("step_key")
        message = meta.get("orig_message") or record.getMessage()
        return f"[{step}] {message}" if step else message


@dg.logger(
    config_schema={"log_level": dg.Field(str, default_value="INFO", is_required=False)},
    description="Asset progress on stdout (INFO and above), one plain line per message.",
)
def plain_console(init_context: dg.InitLoggerContext) -> logging.Logger:
    logger = logging.Logger("lora_pipeline", level=init_context.logger_config["log_level"])
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_PlainFormatter())
    handler.addFilter(_not_a_failure_event)
    logger.addHandler(handler)
    return logger


@dg.definitions
def loggers() -> dg.Definitions:
    return dg.Definitions(loggers={"console": plain_console})
