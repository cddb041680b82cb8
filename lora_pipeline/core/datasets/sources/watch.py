"""What the sensors look at each tick: only what changed since the last tick, never the whole history.

A year of handoffs is thousands of batch folders and a thousand specs; listing them all, and looking into each
folder for `_READY`, every 30 s costs time proportional to the history (issue 26). A watched folder's state
(kept in the sensor's cursor) is its modification time at the last listing and the names left **pending** then:
entries not registered yet that may still become something (a batch folder without `_READY` yet, one still
arriving, a spec that does not load or waits for the versions it copies). Creating, removing or renaming an
entry moves the folder's modification time, so:

- folder unchanged since the last tick: only the pending names are looked at again;
- folder changed: it is listed once (names only: no look into any entry), and the names neither pending nor
  registered are looked at, with the pending ones.

Writing into an existing entry (`_READY` touched in a batch folder, a spec fixed in place) does not move the
folder's time, which is why the entries that could still change are pending. A modification time within
`TRUST_AFTER_S` of now is not trusted (a file system with coarse timestamps could show the same time after a
later change): the folder is listed again at the next tick. An unreadable or foreign cursor trusts nothing.

`Watch.examined` names every entry looked at: the sensors log the count, the tests count it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRUST_AFTER_S = 2.0


@dataclass
class Watch:
    """One tick's look at a watched folder: the candidate names to examine, and the state for the next cursor."""

    folder: Path
    listed: bool  # whether the folder was listed this tick
    candidates: list[str]
    mtime_ns: int | None
    trusted: bool
    pending: list[str] = field(default_factory=list)
    examined: list[str] = field(default_factory=list)

    def keep_pending(self, name: str) -> None:
        """A name that may still change inside its entry: looked at again at the next tick."""
        if name not in self.pending:
            self.pending.append(name)

    def state(self) -> dict[str, Any]:
        return {"mtime_ns": self.mtime_ns if self.trusted else None, "pending": sorted(self.pending)}


def _entry_names(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return [e.name for e in entries]


def watch_folder(folder: Path, previous: Any, now_ns: int, unknown: Callable[[list[str]], Iterable[str]],
                 name_of: Callable[[str], str | None]) -> Watch:
    """Look at `folder` (module docstring). `previous`: the state a former `Watch.state()` returned (anything
    else trusts nothing); `unknown(names)`: those of the names not registered yet; `name_of(entry)`: the name an
    entry stands for (None: never a candidate, such as a hidden entry)."""
    before = previous if isinstance(previous, dict) else {}
    kept = before.get("pending")
    pending = [n for n in kept if isinstance(n, str)] if isinstance(kept, list) else []
    try:
        mtime_ns = folder.stat().st_mtime_ns
    except FileNotFoundError:
        return Watch(folder, False, [], None, False)
    trusted = now_ns - mtime_ns > TRUST_AFTER_S * 1e9
    if before.get("mtime_ns") == mtime_ns and isinstance(mtime_ns, int):
        names, listed = pending, False
    else:
        listed = True
        names = list(dict.fromkeys(pending + [n for e in _entry_names(folder) if (n := name_of(e)) is not None]))
    candidates = list(unknown(names)) if names else []
    return Watch(folder, listed, candidates, mtime_ns, trusted)


def yaml_name(entry: str) -> str | None:
    """The stem of a `<name>.yaml` entry (specs, recipes); None for any other file or a hidden one."""
    return entry[: -len(".yaml")] if entry.endswith(".yaml") and not entry.startswith(".") else None


def folder_name(entry: str) -> str | None:
    """A batch folder's entry name; None for a hidden one (intake's staging copies, never content)."""
    return None if entry.startswith(".") else entry
