"""Fine-tuning's guard: the objective's own error before and after training, and the input kept when training
made it worse.

The error is the distillation term the run minimises (KL to the teacher for "logits", the relative feature
error for "features", their sum for "both"; never the cross-entropy), measured with both models in eval mode
on the first ``GUARD_IMAGES`` images of the data, un-augmented, as the model will be used. These are images
the run trains on (fine-tuning keeps no images aside), so the guard catches divergence and drifting norm
statistics, not over-fitting.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn

from ..data import split_batch
from ..engine import SurgeryNotice
from ..utils import eval_mode
from .distill import Taps, training_loss

__all__ = ["GUARD_IMAGES", "guard_images", "keep_better", "objective_error"]

GUARD_IMAGES = 256  # images the before/after error is measured on


def guard_images(loader, limit: int = GUARD_IMAGES) -> torch.Tensor:
    """The first ``limit`` images of ``loader``, on the CPU, kept so that before and after see the same ones.

    Args:
        loader: (images, labels) or images batches.
        limit: how many images to keep.

    Returns:
        Tensor: the images.
    """
    kept, count = [], 0
    for batch in loader:
        images, _ = split_batch(batch)
        kept.append(images[: limit - count].cpu())
        count += len(kept[-1])
        if count >= limit:
            break
    return torch.cat(kept)


def objective_error(student: nn.Module, teacher: nn.Module, images: torch.Tensor, *, objective: str,
                    pool: tuple | None, temperature: float, device, batch_size: int = 64) -> float:
    """The mean distillation term of ``student`` against ``teacher`` on ``images`` (both in eval mode, no
    gradients: neither model changes, BatchNorm counters included).

    Args:
        student: the model measured.
        teacher: the model it should reproduce.
        images: the images (moved to ``device`` a batch at a time).
        objective: "logits", "features" or "both".
        pool: the student's and the teacher's global pools whose inputs "features" compares (None for "logits").
        temperature: the distillation temperature.
        device: where the models are.
        batch_size: images per forward pass.

    Returns:
        float: the error, averaged over images (nan or inf when the student's outputs are not finite).
    """
    taps = Taps()
    if pool is not None:
        taps.attach(student, teacher, pool)
    total = 0.0
    try:
        with eval_mode(student, teacher), torch.no_grad():
            for chunk in images.split(batch_size):
                chunk = chunk.to(device)
                teacher_logits = teacher(chunk)
                distill, _ = training_loss(objective, student(chunk), teacher_logits, taps, None,
                                           temperature=temperature, alpha=1.0)
                total += float(distill) * len(chunk)
    finally:
        taps.remove()
    return total / max(1, len(images))


def keep_better(trained: nn.Module, given: nn.Module, before: float, after: float) -> tuple[nn.Module, str]:
    """``trained`` when its error ``after`` is finite and no worse than ``before``, else a copy of ``given``
    (with a SurgeryNotice): a worse result is never returned as if it were better.

    Args:
        trained: the model fine-tuning produced.
        given: the model it started from (left untouched).
        before: the error of ``given``.
        after: the error of ``trained``.

    Returns:
        tuple: (the model to return, what was kept, for the report).
    """
    if math.isfinite(after) and after <= before:
        return trained, "trained"
    kept = f"input (training left the error at {after:.4g}, above its {before:.4g})"
    warnings.warn(f"fine-tuning made the model worse by its own measure ({before:.4g} -> {after:.4g}); the input "
                  "model is returned unchanged: lower the learning rate", SurgeryNotice, stacklevel=5)
    return copy.deepcopy(given).to(next(trained.parameters()).device), kept
