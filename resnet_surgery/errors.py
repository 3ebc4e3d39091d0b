"""User-facing errors: the CLI prints them as one line and exits with code 2."""

__all__ = ["NotExactError", "SurgeryError", "TraceError", "first_line"]


class SurgeryError(Exception):
    """Something the user can fix; the message says what is wrong and how to fix it."""


class NotExactError(SurgeryError):
    """An ``exact=True`` request that no function-preserving rewrite can satisfy."""


class TraceError(SurgeryError):
    """torch.fx could not trace the model."""


def first_line(e: BaseException, limit: int = 120) -> str:
    """The first line of an exception's message, for one-line errors: libraries put whole dumps in theirs.

    Args:
        e: the exception.
        limit: at most this many characters.

    Returns:
        The message's first non-empty line, cut to ``limit``; the exception's type name when the message is empty.
    """
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__
