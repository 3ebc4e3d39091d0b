"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class SurgeryError(Exception):
    """Something the user can fix; the message says what is wrong and how to fix it."""


class NotExactError(SurgeryError):
    """An ``exact=True`` request that no function-preserving rewrite can satisfy."""


class TraceError(SurgeryError):
    """torch.fx could not trace the model."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when the message is empty), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0][:120] if text else type(e).__name__
