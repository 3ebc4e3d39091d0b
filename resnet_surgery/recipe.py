"""The recipe of a conversion (typed, validated, versioned) and a converted model as a folder without pickle.

A folder written by ``save`` holds ``model.safetensors``, ``recipe.json`` and ``summary.txt``. The
recipe names the source model and every conversion applied to it, so ``load`` rebuilds the
architecture (source model + replayed conversions) and then loads the weights. recipe.json is
``Recipe.to_json()``; reading it checks its format version and every field, and a bad file is one
error naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import warnings
from enum import Enum
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_dir
from .errors import SurgeryError
from .history import SOURCE_KINDS, Source, history, record
from .models import load_named, load_state_into, read_state_dict
from .vocab import Op, Shortcut, Variant

FORMAT_VERSION = 1
RECIPE_FORMAT = f"resnet-surgery/{FORMAT_VERSION}"
WEIGHTS_FILE = "model.safetensors"
RECIPE_FILE = "recipe.json"
SUMMARY_FILE = "summary.txt"


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
    transplant: dict | None = None  # transplant: the source, what was paired, the probe difference
    trunk: str | None = None  # the rewritten submodule of a model fx cannot trace whole (a detection backbone)

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


# --- folders -----------------------------------------------------------------------------------------


def save(model: nn.Module, out: str | os.PathLike, *, force: bool = False, summary: str = "") -> Path:
    """Write ``model.safetensors``, ``recipe.json`` and ``summary.txt`` to ``out`` atomically."""
    recipe = history(model).recipe
    if recipe is None:
        raise SurgeryError("this model has no recipe: save the result of resnet_surgery.convert()")
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_dir(out, force) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": recipe.format})
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe.to_json(), indent=2) + "\n")
        (tmp / SUMMARY_FILE).write_text(summary + ("\n" if summary and not summary.endswith("\n") else ""))
    return Path(out)


def read_recipe(path: str | os.PathLike) -> Recipe:
    """The validated recipe of a folder written by ``save`` (or of a recipe.json file)."""
    path = Path(path)
    file = path / RECIPE_FILE if path.is_dir() else path
    if not file.is_file():
        raise SurgeryError(f"{path} is not a folder written by `resnet-surgery convert` (no {RECIPE_FILE})")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SurgeryError(f"{file} is not valid JSON ({e}); convert the model again") from None
    return Recipe.from_json(data, str(file))


def apply_recipe(model: nn.Module, recipe: Recipe | dict | str | os.PathLike) -> nn.Module:
    """Re-apply a recipe's conversions to ``model`` (e.g. a custom model) and check it did the same rewrites."""
    from .rewrite import SurgeryNotice, convert  # rewrite.py builds its recipes with this module's classes

    if isinstance(recipe, dict):
        recipe = Recipe.from_json(recipe)
    elif not isinstance(recipe, Recipe):
        recipe = read_recipe(recipe)
    converted = model
    for step in recipe.conversions:
        opts = step.options
        if opts.to is None and opts.shortcut is None and not opts.prune_dead:
            continue  # a transplant that needed no conversion: nothing to replay
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SurgeryNotice)
            converted = convert(converted, opts.to, shortcut=opts.shortcut, exact=opts.exact,
                                prune_dead=opts.prune_dead, input_size=tuple(opts.input_size))
        done = [(r.block, r.op) for r in history(converted).recipe.rewrites]
        wanted = [(r.block, r.op) for r in step.rewrites]
        if done != wanted:
            raise SurgeryError(f"the recipe does not fit this model: it rewrote {len(wanted)} blocks "
                               f"({wanted[:2]}...), this model gives {len(done)} ({done[:2]}...)")
    return record(converted, recipe=recipe)


def load(folder: str | os.PathLike) -> nn.Module:
    """Rebuild a model saved by ``save``/``convert --out``: source architecture + recipe + safetensors weights."""
    recipe = read_recipe(folder)
    if not recipe.source.loadable:
        raise SurgeryError(f"{folder} was converted from a custom model ({recipe.source.model}): build that model, "
                           "then resnet_surgery.apply_recipe(model, recipe) and load model.safetensors")
    model = apply_recipe(load_named(recipe.source.model, "none"), recipe)
    load_state_into(model, read_state_dict(Path(folder) / WEIGHTS_FILE), "the recipe's model",
                    str(Path(folder) / WEIGHTS_FILE))
    return record(model, source=recipe.source).eval()


def load_model(spec: str | os.PathLike, weights: str = "none") -> nn.Module:
    """A model by torchvision name, ``timm:NAME``, CIFAR-10 zoo name, or a folder written by ``convert``."""
    if Path(spec).is_dir():
        return load(spec)
    return load_named(str(spec), weights)
