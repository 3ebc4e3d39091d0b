"""The recipe of a conversion: typed, validated and versioned.

A recipe names the source model and every conversion applied to it, so a folder (``store.save``) can be
rebuilt from it. ``Recipe.to_json()`` is what recipe.json holds; ``Recipe.from_json`` checks the format
version and every field, and a bad file is one error naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
from enum import Enum
from typing import Any, Union, get_args, get_origin, get_type_hints

from torch import nn

from ..errors import SurgeryError
from ..history import SOURCE_KINDS, Source, history
from ..utils import MAX_SIDE, library_versions
from ..vocab import Op, Shortcut, Variant

__all__ = ["Conversion", "FORMAT_VERSION", "Options", "RECIPE_FORMAT", "Recipe", "Rewrite", "new_recipe"]

FORMAT_VERSION = 1
RECIPE_FORMAT = f"resnet-surgery/{FORMAT_VERSION}"


class _ByKey:
    """``recipe["rewrites"]``, ``r["block"]``, ``r.get("norms")``: read access for code written against dicts."""

    def __getitem__(self, key: str):
        if key not in _field_names(self):
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default=None):
        value = getattr(self, key) if key in _field_names(self) else None
        return default if value is None else value

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def to_json(self) -> dict:
        """Plain JSON types; optional fields that are unset are left out."""
        return _to_json(self)

    @classmethod
    def from_json(cls, data, where: str = "recipe"):
        """Build and validate from parsed JSON; SurgeryError naming ``where`` and the bad field."""
        try:
            return _build(cls, data, "")
        except _Invalid as e:
            raise SurgeryError(f"{where}: {e}; it was edited or damaged: convert the model again") from None


@dataclasses.dataclass
class Options(_ByKey):
    """The arguments of one ``convert`` call."""

    to: Variant | None
    shortcut: Shortcut | None
    exact: bool
    prune_dead: bool = False
    input_size: list[int] = dataclasses.field(default_factory=lambda: [3, 224, 224])

    def __post_init__(self):
        # read back from recipe.json too: a size convert could not have written is a damaged file
        if len(self.input_size) != 3 or not all(isinstance(v, int) and 0 < v <= MAX_SIDE for v in self.input_size):
            raise _Invalid(f"options.input_size must be 3 integers from 1 to {MAX_SIDE}, got {_short(self.input_size)}")


@dataclasses.dataclass
class Rewrite(_ByKey):
    """One rewrite of one block: whether it preserves the function, and what it touched."""

    block: str
    op: Op
    exact: bool
    convs: dict[str, str] = dataclasses.field(default_factory=dict)  # rewritten conv -> the original's conv
    norms: list[str] = dataclasses.field(default_factory=list)  # norms whose statistics it changes
    keys: dict[str, str] = dataclasses.field(default_factory=dict)  # old state_dict key -> new key
    # prune_dead only: the subsampled tensor, its readers, and the convs the subsampling reached
    input: str | None = None
    readers: list[str] | None = None
    absorbed: list[str] | None = None
    reduced: list[str] | None = None
    subsampled: list[str] | None = None


@dataclasses.dataclass
class Conversion(_ByKey):
    """An earlier ``convert`` call of a model converted more than once (replayed first on load)."""

    options: Options
    rewrites: list[Rewrite]


@dataclasses.dataclass
class Recipe(_ByKey):
    """Everything needed to rebuild a converted model from its source, and what the conversion did."""

    format: str
    source: Source
    history: list[Conversion]
    options: Options
    variant_before: Variant
    variant_after: Variant
    exact: bool
    rewrites: list[Rewrite]
    notices: list[str]
    versions: dict[str, str]
    calibration: dict | None = None  # summary of the last calibrate
    finetune: dict | None = None  # summary of the last finetune
    recovery: dict | None = None  # summary of the last recover
    transplant: dict | None = None  # transplant: the source, what was paired, the probe difference
    trunk: str | None = None  # the rewritten submodule of a model fx cannot trace whole (a detection backbone)

    @property
    def function_source(self) -> Source:
        """Where the model's function came from: a transplant's source (its weights are what it computes), else
        the source it was converted from; kind "custom" when that cannot be built again by name."""
        if self.transplant is None:
            return self.source
        given = self.transplant.get("source")
        given = given if isinstance(given, dict) else {}
        kind = given.get("kind") if given.get("kind") in SOURCE_KINDS else "custom"
        text = {k: given.get(k) if isinstance(given.get(k), str) else None for k in ("model", "weights",
                                                                                    "weights_sha256")}
        return Source(text["model"] or "an unnamed model", kind, text["weights"], text["weights_sha256"])

    @property
    def conversions(self) -> list[Conversion]:
        """Every convert call in order, this one last."""
        return [*self.history, Conversion(self.options, self.rewrites)]

    @classmethod
    def from_json(cls, data, where: str = "recipe") -> Recipe:
        _check_format(data, where)
        recipe = super().from_json(data, where)
        if recipe.source.kind not in SOURCE_KINDS:
            raise SurgeryError(f"{where}: source.kind must be one of {', '.join(SOURCE_KINDS)}, "
                               f"got {recipe.source.kind!r}; it was edited or damaged: convert the model again")
        return recipe


# --- JSON: plain values out, validated dataclasses in --------------------------------------------------


class _Invalid(Exception):
    pass


def _field_names(obj) -> set[str]:
    return {f.name for f in dataclasses.fields(obj)}


def _to_json(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not (getattr(obj, f.name) is None and f.default is None)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_json(v) for k, v in obj.items()}
    return obj


def _check_format(data, where: str) -> None:
    fmt = data.get("format") if isinstance(data, dict) else None
    match = re.fullmatch(r"resnet-surgery/(\d+)", fmt) if isinstance(fmt, str) else None
    if not isinstance(data, dict) or match is None:
        got = f"format {fmt!r}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise SurgeryError(f"{where} is not a resnet-surgery recipe ({got}, expected an object with format "
                           f"{RECIPE_FORMAT!r}); pass a folder written by `resnet-surgery convert`")
    if int(match.group(1)) != FORMAT_VERSION:
        raise SurgeryError(f"{where} has format {fmt!r} but this resnet-surgery reads {RECIPE_FORMAT!r}: "
                           "use the resnet-surgery version that wrote it (pip install -U resnet-surgery)")


def _build(cls, data, path: str):
    if not isinstance(data, dict):
        raise _Invalid(f"{path or 'the recipe'} must be a JSON object, got {_short(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise _Invalid(f"{path or 'the recipe'} has an unknown key {unknown[0]!r}")
    hints = get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        where = f"{path}.{name}" if path else name
        if name in data:
            values[name] = _value(hints[name], data[name], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Invalid(f"the key {where!r} is missing")
    return cls(**values)


def _value(hint, value, where: str):
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = get_origin(hint), get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if isinstance(hint, type) and issubclass(hint, Enum):
        if value not in hint.values():
            raise _Invalid(f"{where} must be one of {', '.join(hint.values())}, got {_short(value)}")
        return hint(value)
    if origin is list:
        _expect(isinstance(value, list), where, "a list", value)
        return [_value(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        _expect(isinstance(value, dict), where, "an object", value)
        return {k: _value(args[1], v, f"{where}.{k}") for k, v in value.items()} if args else value
    if hint is bool:
        _expect(isinstance(value, bool), where, "true or false", value)
    elif hint is int:
        _expect(isinstance(value, int) and not isinstance(value, bool), where, "an integer", value)
    elif hint is str:
        _expect(isinstance(value, str), where, "a string", value)
    elif hint is not Any:
        raise TypeError(f"no JSON check for {hint}")  # a field type this reader does not know: a bug here
    return value


def _expect(ok: bool, where: str, what: str, value) -> None:
    if not ok:
        raise _Invalid(f"{where} must be {what}, got {_short(value)}")


def _short(value) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def new_recipe(model: nn.Module, options: Options, before: Variant, after: Variant, rewrites: list[Rewrite],
               notices: list[str]) -> Recipe:
    """The recipe of a model made from ``model`` by one conversion.

    Args:
        model: the model before the conversion; one converted before keeps its first source, and its
            conversions replay first.
        options: what the conversion was asked to do.
        before, after: the variant before and after.
        rewrites: what was rewritten, in order.
        notices: what the user should know (also shown as SurgeryNotice warnings by ``convert``).

    Returns:
        A new Recipe stamped with the library versions.
    """
    prior = history(model).recipe
    source = prior.source if prior else history(model).source or Source(type(model).__name__, "custom")
    # a transplanted model's function stays its transplant source's, whatever conversions follow
    return Recipe(format=RECIPE_FORMAT, source=source, history=prior.conversions if prior else [], options=options,
                  variant_before=before, variant_after=after, exact=all(r.exact for r in rewrites),
                  rewrites=rewrites, notices=notices, versions=library_versions(),
                  transplant=prior.transplant if prior else None)
