"""The command line: each command parses its options, calls one library function and prints."""

from .app import main

__all__ = ["main"]
