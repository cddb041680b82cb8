"""`in_background`: one call on a thread of its own, its result (or its error) waited for where it is needed."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def in_background(name: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
    """Start `call(*args, **kwargs)` on a thread named `name`; `.result()` waits for it and raises its error."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
    try:
        return pool.submit(call, *args, **kwargs)
    finally:
        pool.shutdown(wait=False)  # the thread ends with the call
