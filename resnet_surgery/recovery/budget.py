"""A time limit that the long loops of recovery respect at their step boundaries (set by `recover`).

Reconstruction stops between its optimizer steps and skips the blocks it has not begun, fine-tuning stops
between its steps: each keeps what it has so far (their guards still apply). Outside ``time_limit`` nothing
ever expires, so `calibrate` and `finetune` called on their own run to the end.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator

__all__ = ["expired", "time_limit"]

_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("resnet_surgery_deadline", default=None)


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Let the recovery loops inside run for at most ``seconds`` of wall time from now.

    Args:
        seconds: the limit (None: none; an enclosing limit that ends sooner still holds).
    """
    deadline = None if seconds is None else time.monotonic() + max(0.0, seconds)
    outer = _DEADLINE.get()
    if outer is not None and (deadline is None or outer < deadline):
        deadline = outer
    token = _DEADLINE.set(deadline)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def expired() -> bool:
    """Whether the innermost `time_limit` has run out (never outside one).

    Returns:
        bool: True once the limit has passed.
    """
    deadline = _DEADLINE.get()
    return deadline is not None and time.monotonic() >= deadline
