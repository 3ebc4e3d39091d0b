"""No network for the fuzz harness: an internet connection or name lookup is refused and recorded.

Local (Unix-domain) sockets stay allowed: DataLoader workers pass tensors through them. In this process
``offline()`` records the attempts in a list it checks on leaving; a child process calls ``install()`` first,
which appends each attempt to the file named by RESNET_SURGERY_NETWORK_LOG.
"""

from __future__ import annotations

import contextlib
import os
import socket
from unittest import mock

LOG = "RESNET_SURGERY_NETWORK_LOG"
_INTERNET = (socket.AF_INET, socket.AF_INET6)


def _refusing(record):
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def refuse(what, args):
        record(f"{what}{args!r:.200}")
        raise OSError(f"network access is off in the fuzz harness ({what})")

    def guarded_connect(self, *args):
        return refuse("connect", args) if self.family in _INTERNET else connect(self, *args)

    def guarded_connect_ex(self, *args):
        return refuse("connect_ex", args) if self.family in _INTERNET else connect_ex(self, *args)

    return {(socket.socket, "connect"): guarded_connect, (socket.socket, "connect_ex"): guarded_connect_ex,
            (socket, "getaddrinfo"): lambda *args, **kw: refuse("getaddrinfo", args),
            (socket, "gethostbyname"): lambda *args: refuse("gethostbyname", args)}


@contextlib.contextmanager
def offline():
    """No network inside; fails on leaving if anything tried to reach it."""
    attempts: list[str] = []
    with contextlib.ExitStack() as stack:
        for (owner, name), replacement in _refusing(attempts.append).items():
            stack.enter_context(mock.patch.object(owner, name, replacement))
        yield
    assert not attempts, f"network access attempted: {attempts}"


def install() -> None:
    """No network for the rest of this process; each attempt is appended to the file named by $RESNET_SURGERY_NETWORK_LOG."""
    path = os.environ[LOG]

    def record(line: str) -> None:
        with open(path, "a") as f:
            f.write(line + "\n")

    for (owner, name), replacement in _refusing(record).items():
        setattr(owner, name, replacement)
