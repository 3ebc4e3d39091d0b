"""Save a converted model as a folder (weights + recipe), and rebuild it without pickle."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_dir
from .errors import SurgeryError
from .models import load_model, load_state_into, read_state_dict
from .rewrite import SurgeryNotice, convert

WEIGHTS_FILE = "model.safetensors"
RECIPE_FILE = "recipe.json"
SUMMARY_FILE = "summary.txt"


def save(model: nn.Module, out: str | os.PathLike, *, force: bool = False, summary: str = "") -> Path:
    """Write ``model.safetensors``, ``recipe.json`` and ``summary.txt`` to ``out`` atomically."""
    recipe = getattr(model, "resnet_surgery_recipe", None)
    if recipe is None:
        raise SurgeryError("this model has no resnet_surgery_recipe: save the result of resnet_surgery.convert()")
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_dir(out, force) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": recipe["format"]})
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
        (tmp / SUMMARY_FILE).write_text(summary + ("\n" if summary and not summary.endswith("\n") else ""))
    return Path(out)


def read_recipe(folder: str | os.PathLike) -> dict:
    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        raise SurgeryError(f"{folder} is not a folder written by `resnet-surgery convert` (no {RECIPE_FILE})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SurgeryError(f"{path} is not valid JSON ({e})") from None


def apply_recipe(model: nn.Module, recipe: dict | str | os.PathLike) -> nn.Module:
    """Re-apply a recipe's conversion to ``model`` (e.g. a custom model) and check it did the same rewrites."""
    if not isinstance(recipe, dict):
        recipe = read_recipe(recipe) if Path(recipe).is_dir() else json.loads(Path(recipe).read_text())
    converted = model
    for step in [*recipe.get("history", []), recipe]:
        opts = step["options"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SurgeryNotice)
            converted = convert(converted, opts["to"], shortcut=opts["shortcut"], exact=opts["exact"],
                                prune_dead=opts.get("prune_dead", False), input_size=tuple(opts["input_size"]))
        done = [(r["block"], r["op"]) for r in converted.resnet_surgery_recipe["rewrites"]]
        wanted = [(r["block"], r["op"]) for r in step["rewrites"]]
        if done != wanted:
            raise SurgeryError(f"the recipe does not fit this model: it rewrote {len(wanted)} blocks "
                               f"({wanted[:2]}...), this model gives {len(done)} ({done[:2]}...)")
    converted.resnet_surgery_recipe = recipe
    return converted


def load(folder: str | os.PathLike) -> nn.Module:
    """Rebuild a model saved by ``save``/``convert --out``: source architecture + recipe + safetensors weights."""
    recipe = read_recipe(folder)
    source = recipe.get("source", {})
    if source.get("kind") not in ("torchvision", "timm", "zoo"):
        raise SurgeryError(f"{folder} was converted from a custom model ({source.get('model')}): build that model, "
                           "then resnet_surgery.apply_recipe(model, recipe) and load model.safetensors")
    model = apply_recipe(load_model(source["model"], "none"), recipe)
    load_state_into(model, read_state_dict(Path(folder) / WEIGHTS_FILE), "the recipe's model",
                    str(Path(folder) / WEIGHTS_FILE))
    return model.eval()
