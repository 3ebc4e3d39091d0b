"""Public functions check their arguments' types from their annotations, so that a wrong type is one
TypeError naming the argument, not an AttributeError (or a float seed reaching torch.manual_seed) deep
inside. Ranges and meanings stay with each function, which knows them.

Only annotations made of plain types are checked: ``int``, ``float``, ``bool``, ``str``, ``None``, tuples
(a list is taken for one), sequences, ``os.PathLike``, the package's own classes (an options object) and
unions of them; anything else (a module, data in any of its forms) is left to the function. A bool is not
taken for an int or a float, nor an int for a bool; an int is taken for a float.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import os
import types
import typing

from .errors import SurgeryError

__all__ = ["check_fields", "checked_arguments", "with_overrides"]

_PLAIN = (int, float, bool, str, type(None), tuple, list, dict, os.PathLike)


def checked_arguments(fn):
    """``fn`` with its plainly annotated arguments checked on every call (see the module docstring).

    Args:
        fn: a public function.

    Returns:
        The wrapped function (same signature and docstring).
    """
    signature = inspect.signature(fn)
    hints = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal hints
        if hints is None:
            hints = _plain_hints(fn, signature)
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{fn.__name__}(): {e}") from None
        for name, value in bound.arguments.items():
            hint = hints.get(name)
            if hint is not None and not _fits(value, hint):
                raise TypeError(f"{fn.__name__}(): {name} takes {_words(hint)}, got {value!r:.80}")
            if hint is not None and _names_a_path(hint) and (problem := _unusable_path(value)):
                raise SurgeryError(f"{fn.__name__}(): {name} {problem} ({value!r:.60}); pass a usable path")
        return fn(*args, **kwargs)

    return wrapper


def _names_a_path(hint) -> bool:
    return hint is os.PathLike or any(_names_a_path(h) for h in typing.get_args(hint))


def _unusable_path(value) -> str | None:
    """Why ``value`` cannot name a file on this system (every call on it would fail with an OSError), or None."""
    if not isinstance(value, str | os.PathLike):
        return None
    text = os.fsencode(value)
    if b"\x00" in text:
        return "holds a NUL character"
    if len(text) >= 4096 or any(len(part) > 255 for part in text.split(b"/")):
        return "is longer than this system allows (255 bytes a name, 4096 a path)"
    return None


def check_fields(options, owner: str) -> None:
    """The plainly annotated fields of a dataclass of options, checked as `checked_arguments` checks arguments.

    Args:
        options: a dataclass instance (RecoverOptions, ExploreOptions).
        owner: who takes it, for the message ("explore()").

    Raises:
        TypeError: a field of the wrong type, naming it.
    """
    import dataclasses
    import sys

    namespace = vars(sys.modules[type(options).__module__])
    for field in dataclasses.fields(options):
        hint = _plain_hint(field.type, namespace)
        value = getattr(options, field.name)
        if hint is not None and not _fits(value, hint):
            raise TypeError(f"{owner}: {field.name} takes {_words(hint)}, got {value!r:.80}")


def _plain_hints(fn, signature: inspect.Signature) -> dict:
    """The parameters whose annotation is made of plain types, resolved; the others are left out."""
    hints = {}
    for name, parameter in signature.parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        hint = _plain_hint(parameter.annotation, getattr(fn, "__globals__", {}))
        if hint is not None:
            hints[name] = hint
    return hints


def _plain_hint(annotation, module_namespace: dict):
    """``annotation`` resolved in its module when it is made of plain types; None when it is not (or is empty,
    or names something only imported for type checking)."""
    if annotation is inspect.Parameter.empty:
        return None
    try:
        namespace = {**vars(typing), "os": os, **module_namespace}
        hint = eval(annotation, namespace) if isinstance(annotation, str) else annotation  # noqa: S307
    except Exception:  # noqa: BLE001 - a name only imported for type checking: not checked
        return None
    return hint if _plain(hint) else None


def _plain(hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return all(_plain(h) for h in typing.get_args(hint))
    if origin is not None:
        return origin in (tuple, list, dict, collections.abc.Sequence) and all(
            h is Ellipsis or _plain(h) for h in typing.get_args(hint))
    own = isinstance(hint, type) and hint.__module__.split(".")[0] == __name__.split(".")[0]
    return hint in _PLAIN or hint is None or hint is collections.abc.Sequence or own


def _fits(value, hint) -> bool:
    if hint is None or hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if origin is not None:
        container = {collections.abc.Sequence: (list, tuple), tuple: (list, tuple)}.get(origin, origin)
        if not isinstance(value, container) or isinstance(value, str):
            return False
        items = [h for h in typing.get_args(hint) if h is not Ellipsis]
        if origin is dict:
            return True
        if origin is tuple and Ellipsis not in typing.get_args(hint) and items:
            return len(value) == len(items) and all(_fits(v, h) for v, h in zip(value, items))
        return not items or all(_fits(v, items[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is collections.abc.Sequence:
        return isinstance(value, list | tuple)
    return isinstance(value, hint)


def _words(hint) -> str:
    """An annotation as the error says it: "int or None", "a sequence of str"."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_words(h) for h in typing.get_args(hint))
    if origin is not None:
        items = [h for h in typing.get_args(hint) if h is not Ellipsis]
        name = {collections.abc.Sequence: "a sequence"}.get(origin, f"a {origin.__name__}")
        return name + (f" of {_words(items[0])}" if items else "")
    if hint is None or hint is type(None):
        return "None"
    return {os.PathLike: "a path"}.get(hint, getattr(hint, "__name__", str(hint)))


def with_overrides(cls, options, overrides: dict, owner: str):
    """``options`` (an instance of ``cls``, or None for its defaults) with ``overrides`` set and every field's
    type checked.

    Args:
        cls: the options class.
        options: the options given, or None.
        overrides: field names and values to set.
        owner: the function, for the messages ("finetune()").

    Returns:
        The options to run with.

    Raises:
        TypeError: ``options`` of another class, an override that is not a field, or a field of the wrong type.
    """
    options = cls() if options is None else options
    if not isinstance(options, cls):
        raise TypeError(f"{owner}: options takes a {cls.__name__}, got {options!r:.80}")
    if unknown := sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)}):
        raise TypeError(f"{owner} got an unexpected keyword argument {unknown[0]!r} (not a field of {cls.__name__})")
    options = dataclasses.replace(options, **overrides)
    check_fields(options, owner)
    return options
