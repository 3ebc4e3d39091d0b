"""recover's inputs checked before any work: the target, the budget (also against one timed forward pass) and
the stages."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..defaults import RECOVER_STAGES
from ..errors import SurgeryError
from .calibrate import BN_WORK
from .reconstruct import macs_per_image
from .recover_report import format_seconds

__all__ = ["check_budget", "check_stages", "check_target_and_budget"]


def check_target_and_budget(target: float | None, budget: float | None) -> None:
    """`recover`'s target and budget checked on their own (for callers that check before other work).

    Args:
        target: the target gap in points, or None.
        budget: the budget in seconds, or None.

    Raises:
        SurgeryError: either is not a finite number above zero.
    """
    for name, value in (("target", target), ("budget", budget)):
        if value is not None and not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise SurgeryError(f"recover's {name} must be a number > 0, not {value!r}")


def check_stages(stages) -> None:
    """`recover`'s stages checked on their own.

    Args:
        stages: stage names, a non-empty subset of RECOVER_STAGES.

    Raises:
        SurgeryError: an unknown stage, or none.
    """
    if isinstance(stages, str) or not all(isinstance(s, str) for s in stages):
        raise SurgeryError(f"recover's stages are a list of names from {', '.join(RECOVER_STAGES)}, not {stages!r}")
    if unknown := [s for s in stages if s not in RECOVER_STAGES]:
        raise SurgeryError(f"unknown recover stage {unknown[0]!r}; choose from {', '.join(RECOVER_STAGES)}")
    if not stages:
        raise SurgeryError("recover needs at least one stage; choose from " + ", ".join(RECOVER_STAGES))


def check_budget(budget: float | None, original: nn.Module, image: torch.Tensor, calib_images: int, held_images: int,
                 image_seconds: float) -> None:
    """A budget that cannot fit one BatchNorm pass and the measurements around it, refused before any work.

    Args:
        budget: wall seconds, or None.
        original: the original model (its MACs per image bound the BatchNorm pass).
        image: one input image, batch of 1.
        calib_images: images the BatchNorm pass could use.
        held_images: held-back images measured before and after.
        image_seconds: one image's forward pass, probed.

    Raises:
        SurgeryError: the budget is too small, with the budget that would fit.
    """
    if budget is None:
        return
    bn_images = min(calib_images, max(1, BN_WORK // max(1, macs_per_image(original, image))))
    # The original once and the model twice over the held-back images; the BN pass runs both models.
    need = image_seconds * (3 * held_images + 2 * bn_images)
    if budget < need:
        raise SurgeryError(f"a budget of {format_seconds(budget)} cannot fit one BatchNorm pass and its measurements "
                           f"on this machine (about {format_seconds(need)}); give --budget "
                           f"{format_seconds(math.ceil(need * 1.5))} or more, or fewer --eval-images")
