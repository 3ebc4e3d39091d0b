"""What resnet-surgery attached to a model, in one place: read it with ``resnet_surgery.history(model)``.

Each step records its result here instead of setting attributes of its own: ``load_model`` the source,
``convert`` the recipe (saved as recipe.json), ``calibrate`` and ``finetune`` their reports (their
summaries also go into the recipe, so a saved folder keeps them). Steps never change their argument:
they record on the new model they return.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: this module stays light (the package root imports it)
    from torch import nn

    from .engine import Recipe

__all__ = [
    "ATTRIBUTE", "History", "LOADABLE_KINDS", "SOURCE_KINDS", "Source", "history", "record",
    "record_result",
]

ATTRIBUTE = "resnet_surgery_history"
SOURCE_KINDS = ("torchvision", "timm", "zoo", "custom")
LOADABLE_KINDS = ("torchvision", "timm", "zoo")  # what load_model can build again by name


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a model came from: a name ``load_model`` understands, or a custom class."""

    model: str
    kind: str  # torchvision | timm | zoo | custom
    weights: str | None = None  # a name (DEFAULT, none...) or a weights file's absolute path
    weights_sha256: str | None = None  # a weights file's content, so a changed or moved file is refused

    @property
    def loadable(self) -> bool:
        return self.kind in LOADABLE_KINDS


@dataclasses.dataclass(frozen=True)
class History:
    """Everything resnet-surgery knows about a model; every field is None until a step records it."""

    source: Source | None = None  # load_model
    recipe: Recipe | None = None  # convert (and apply_recipe / load)
    calibration: Any = None  # calibrate: a CalibrationReport
    finetune: Any = None  # finetune: a FinetuneReport
    recovery: Any = None  # recover: a RecoveryReport


def history(model: nn.Module) -> History:
    """What resnet-surgery recorded on ``model`` (an empty History for a model it never touched).

    Args:
        model: any model.

    Returns:
        History: the recorded source, recipe and reports (fields None until a step records them).
    """
    found = getattr(model, ATTRIBUTE, None)
    return found if isinstance(found, History) else History()


def record(model: nn.Module, **changes) -> nn.Module:
    """Replace fields of ``model``'s History (a new object: copies made earlier keep theirs); returns ``model``."""
    setattr(model, ATTRIBUTE, dataclasses.replace(history(model), **changes))
    return model


def record_result(model: nn.Module, step: str, report, summary: dict) -> nn.Module:
    """Record a recovery step's ``report`` ("calibration" or "finetune") and keep ``summary`` in the recipe."""
    recipe = history(model).recipe
    if recipe is not None:
        record(model, recipe=dataclasses.replace(recipe, **{step: summary}))
    return record(model, **{step: report})
