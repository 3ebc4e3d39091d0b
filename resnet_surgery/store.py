"""A converted model as a folder without pickle: ``save``, ``load``, ``load_model`` and ``apply_recipe``.

A folder written by ``save`` holds ``model.safetensors``, ``recipe.json`` and ``summary.txt``. ``load``
rebuilds the architecture (the recipe's source model, its conversions replayed with ``convert``) and then
loads the weights, so this module sits above the engine.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from .arguments import checked_arguments
from .atomic import atomic_dir
from .engine import Recipe, convert
from .errors import SurgeryError
from .history import Source, history, record
from .utils import check_model, json_text, private_copy
from .zoo import file_sha256, load_named, load_state_into, non_finite, read_state_dict

__all__ = ["describe", "RECIPE_FILE", "SUMMARY_FILE", "WEIGHTS_FILE", "apply_recipe", "check_offline", "load", "load_into", "load_model", "load_original",
           "load_source", "read_recipe", "save"]

WEIGHTS_FILE = "model.safetensors"
RECIPE_FILE = "recipe.json"
SUMMARY_FILE = "summary.txt"


@checked_arguments
def save(model: nn.Module, out: str | os.PathLike, *, force: bool = False, summary: str | None = None) -> Path:
    """Write ``model.safetensors``, ``recipe.json`` and ``summary.txt`` to ``out`` atomically.

    Args:
        model: a converted model (it must carry the recipe `convert` recorded).
        out: the folder to write.
        force: replace an existing ``out`` (False: an existing folder is an error).
        summary: the text of ``summary.txt`` (None: what the model's history holds, as the command line
            writes it: the source, the conversion and the report of every recovery step).

    Returns:
        Path: ``out``.

    Raises:
        SurgeryError: ``model`` has no recipe or holds NaN or infinite weights, or ``out`` exists without
            ``force``.
        TypeError: an argument of the wrong type (``model`` not a torch module).
    """
    recipe = history(check_model(model)).recipe
    if recipe is None:
        raise SurgeryError("this model has no recipe: save the result of resnet_surgery.convert()")
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if bad := non_finite(state):  # nothing non-finite is ever written
        raise SurgeryError(f"the model holds NaN or infinite weights ({bad}); nothing was written to {out}")
    with atomic_dir(out, force) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": recipe.format})
        (tmp / RECIPE_FILE).write_text(json_text(recipe.to_json()))
        summary = describe(model) if summary is None else summary
        (tmp / SUMMARY_FILE).write_text(summary + ("\n" if summary and not summary.endswith("\n") else ""))
    return Path(out)


def describe(model: nn.Module) -> str:
    """What ``model``'s history holds, as text: where it came from, its conversion, every recovery report.

    Args:
        model: a model resnet-surgery made.

    Returns:
        str: the text (``save`` writes it to summary.txt when it is given no summary).
    """
    h = history(model)
    lines = []
    if h.source is not None:
        lines.append(f"source: {h.source.model} ({h.source.kind}, weights {h.source.weights or 'none'})")
    if h.recipe is not None:
        r = h.recipe
        lines.append(f"converted {r.variant_before} -> {r.variant_after} ({'exact' if r.exact else 'approximate'}): "
                     + ", ".join(f"{w.block} {w.op}{'' if w.exact else ' (approximate)'}" for w in r.rewrites))
    for what, report in (("calibration", h.calibration), ("fine-tuning", h.finetune), ("recovery", h.recovery)):
        if report is not None:
            lines += [f"{what}:", str(report)]
    return "\n".join(lines)


@checked_arguments
def read_recipe(path: str | os.PathLike) -> Recipe:
    """The validated recipe of a folder written by ``save`` (or of a recipe.json file).

    Args:
        path: a folder written by ``save``, or a recipe.json file.

    Returns:
        Recipe: the recipe, validated.

    Raises:
        SurgeryError: no recipe.json there, or one that is not valid JSON or not a valid recipe.
        TypeError: ``path`` is not a str or path.
    """
    path = Path(path)
    file = path / RECIPE_FILE if path.is_dir() else path
    if not file.is_file():
        raise SurgeryError(f"{path} is not a folder written by `resnet-surgery convert` (no {RECIPE_FILE})")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SurgeryError(f"{file} is not valid JSON ({e}); convert the model again") from None
    return Recipe.from_json(data, str(file))


@checked_arguments
def apply_recipe(model: nn.Module, recipe: Recipe | dict | str | os.PathLike) -> nn.Module:
    """Re-apply a recipe's conversions to ``model`` (e.g. a custom model) and check it did the same rewrites.

    Args:
        model: the model the recipe was made from (untouched, unless there is no conversion to replay: then
            it is returned itself, with the recipe recorded).
        recipe: a Recipe, its JSON as a dict, or a folder written by ``save`` or recipe.json file.

    Returns:
        Module: the converted model, with ``recipe`` recorded in its history.

    Raises:
        SurgeryError: an invalid recipe, a conversion that fails, or rewrites that differ from the recipe's.
        TypeError: ``model`` is not a torch module, or ``recipe`` of another type.
    """
    check_model(model)
    if isinstance(recipe, dict):
        recipe = Recipe.from_json(recipe)
    elif not isinstance(recipe, Recipe):
        recipe = read_recipe(recipe)
    converted = model
    for step in recipe.conversions:
        opts = step.options
        if opts.to is None and opts.shortcut is None and not opts.prune_dead:
            continue  # a transplant that needed no conversion: nothing to replay
        converted = convert(converted, opts.to, shortcut=opts.shortcut, exact=opts.exact,
                            prune_dead=opts.prune_dead, input_size=tuple(opts.input_size), warn=False)
        done = [(r.block, r.op) for r in history(converted).recipe.rewrites]
        wanted = [(r.block, r.op) for r in step.rewrites]
        if done != wanted:
            raise SurgeryError(f"the recipe does not fit this model: it rewrote {len(wanted)} blocks "
                               f"({wanted[:2]}...), this model gives {len(done)} ({done[:2]}...)")
    return record(converted, recipe=recipe)


@checked_arguments
def load(folder: str | os.PathLike) -> nn.Module:
    """Rebuild a model saved by ``save`` (or ``convert --out``).

    Args:
        folder: a folder written by ``save``.

    Returns:
        The recipe's source model (built by name, no download) with its conversions replayed and the folder's
        safetensors weights loaded, in eval mode.

    Raises:
        SurgeryError: no folder written by ``save`` there (no recipe.json, or an invalid one), a recipe whose
            source is a custom model, unknown or would be downloaded, conversions that do not replay, or
            weights that are missing, unreadable or do not fit the model.
        TypeError: ``folder`` is not a str or path.
    """
    recipe = read_recipe(folder)
    if not recipe.source.loadable:
        raise SurgeryError(f"{folder} was converted from a custom model ({recipe.source.model}): build that model, "
                           "then resnet_surgery.apply_recipe(model, recipe) and load model.safetensors")
    check_offline(recipe.source.model, folder)
    return load_into(load_named(recipe.source.model, "none"), folder)


def check_offline(name: str, folder: str | os.PathLike) -> None:
    """Refuse a recipe's source that would be fetched from the network (a timm hub or local-dir name): loading a
    folder never downloads, and its recipe.json is a file anyone may have edited.

    Args:
        name: the recipe's source model.
        folder: the folder, for the message.
    """
    timm_name = name.removeprefix("timm:") if name.startswith("timm:") else None
    if timm_name is not None and not re.fullmatch(r"[A-Za-z0-9_.\-]+", timm_name):
        raise SurgeryError(f"{folder}'s recipe names the source {name!r}, which timm would fetch (hub or path); loading "
                           f"a folder never downloads: if you trust it, load_into(load_model({name!r}), folder)")


def load_into(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """A folder written by ``save`` rebuilt on ``model`` (the folder's source model, built by the caller).

    Args:
        model: the model the folder was converted from (untouched: the conversions replay on a copy).
        folder: a folder written by ``save``.

    Returns:
        The converted model with the folder's weights, in eval mode.
    """
    check_model(model)
    recipe = read_recipe(folder)
    if not any(c.options.to or c.options.shortcut or c.options.prune_dead for c in recipe.conversions):
        model = private_copy(model)  # nothing to replay, so apply_recipe would return the caller's model itself
    model = apply_recipe(model, recipe)
    weights = Path(folder) / WEIGHTS_FILE
    load_state_into(model, read_state_dict(weights), "the recipe's model", str(weights))
    return record(model, source=recipe.source).eval()


@checked_arguments
def load_model(spec: str | os.PathLike, weights: str = "none") -> nn.Module:
    """A model by torchvision name, ``timm:NAME``, CIFAR-10 zoo name, or a folder written by ``convert``.

    Args:
        spec: the model's name, or a folder written by ``convert`` (or ``save``).
        weights: a named model's weights: a torchvision enum name (DEFAULT, IMAGENET1K_V2...), a weights file,
            or "none" (the default: random init); ignored for a folder.

    Returns:
        Module: the model in eval mode, its source recorded in ``history(model).source``.

    Raises:
        SurgeryError: an unknown name, weights that cannot be loaded, or a folder that cannot be rebuilt.
        TypeError: ``spec`` or ``weights`` of the wrong type.
    """
    if Path(spec).is_dir():
        return load(spec)
    return load_named(str(spec), weights)


def load_source(source: Source, what: str = "the source") -> nn.Module:
    """A recorded source built again, with its weights: refused in one line when it cannot be the same model
    (a custom class, random weights, or a weights file that is gone or no longer has the recorded sha256).

    Args:
        source: e.g. ``recipe.function_source``.
        what: how the error names it.

    Returns:
        The model, as ``load_model`` builds it.
    """
    if not source.loadable:
        raise SurgeryError(f"{what} is {source.model}, a custom model that cannot be built by name; pass it "
                           "yourself (--original MODEL --weights W)")
    check_offline(source.model, what)  # a recorded name is a file's word: never a download
    weights = source.weights or "none"
    if weights.lower() == "none":
        raise SurgeryError(f"{what} is {source.model} with random weights, which cannot be built again; pass it "
                           "yourself (--original MODEL --weights W)")
    if source.weights_sha256 is not None:
        if not Path(weights).is_file():
            raise SurgeryError(f"the weights file of {what} ({weights}) is gone; pass --original MODEL --weights W")
        if file_sha256(weights) != source.weights_sha256:
            raise SurgeryError(f"the weights file of {what} ({weights}) changed since it was recorded (sha256 "
                               f"{source.weights_sha256[:12]}...); pass --original MODEL --weights W")
    return load_named(source.model, weights)


@checked_arguments
def load_original(converted: nn.Module, model: str | os.PathLike | None = None, weights: str | None = None) -> nn.Module:
    """The model ``converted`` was converted from, as its recipe records it (what `calibrate`, `finetune` and
    `recover` take as the original), or ``model`` with ``weights`` when given.

    Args:
        converted: a converted model (e.g. from `load`), whose recipe names its source.
        model: load this model instead (a name or a folder; None: the recorded source).
        weights: its weights (None: the recorded ones when ``model`` is the recorded source, else random).

    Returns:
        Module: the original model in eval mode.

    Raises:
        SurgeryError: ``converted`` has no recipe, its source cannot be built by name (a custom model, random
            weights, a weights file that is gone or changed), or ``model`` or ``weights`` cannot be loaded.
        TypeError: an argument of the wrong type.
    """
    check_model(converted, "converted")
    recipe = history(converted).recipe
    if recipe is None:
        raise SurgeryError("the model has no recipe (it was not converted by resnet-surgery): pass the original "
                           "yourself (--original MODEL --weights W)")
    source = recipe.function_source  # a transplant's source: its weights are what the model computes
    if model is None:
        if not source.loadable:
            raise SurgeryError(f"the converted folder's function comes from {source.model}, which cannot be built "
                               "by name; pass --original MODEL (and --weights)")
        model = source.model
    if weights is None and str(model) == source.model:
        if recipe.transplant is not None or source.weights_sha256 is not None:
            return load_source(source, "the original (recorded in the recipe)")
        weights = source.weights or "none"
    return load_model(model, weights or "none")
