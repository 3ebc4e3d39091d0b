"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class SurgeryError(Exception):
    """Something the user can fix; the message says what is wrong and how to fix it."""


class NotExactError(SurgeryError):
    """An ``exact=True`` request that no function-preserving rewrite can satisfy."""


class TraceError(SurgeryError):
    """torch.fx could not trace the model."""
