"""The settings of `calibrate` and `finetune` as public options objects, as `RecoverOptions` is `recover`'s:
each function takes ``options=`` and, for convenience, any field as a keyword (``finetune(..., steps=500)``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ..defaults import RECONSTRUCT_LR

__all__ = ["DEFAULT_STEPS", "CalibrateOptions", "FinetuneOptions"]

DEFAULT_STEPS = ("bn", "reconstruct")  # calibrate's steps unless told otherwise


@dataclasses.dataclass(frozen=True)
class CalibrateOptions:
    """How `calibrate` repairs the rewritten blocks.

    Args:
        num_images: a seeded random subset of the data (None: all of it).
        steps: the calibration steps, in order ("bn", "transfer", "reconstruct").
        iterations: reconstruction steps per block (None: RECONSTRUCT_ITERATIONS, fewer for a block whose MACs
            would pass RECONSTRUCT_WORK: 20 to 70 for ResNet-50's at 224 px).
        lr: reconstruction's peak learning rate, relative to each parameter tensor's RMS.
        previous: reconstruct the block before each rewritten block jointly with it.
        ridge: the refit's ridge, relative to the mean input energy.
        batch_size: images per batch.
        preset: the preprocessing preset of a path (None: see ``transform``).
        transform: the preprocessing of a path's images (None: by the rule of `preprocessing`).
        seed: seed of the subset and of reconstruction's mini-batches.
        after: reconstruct up to this many blocks after each rewritten block with it (see `reconstruct_blocks`).
        bf16: reconstruct under bfloat16 autocast.
        channels_last: run every pass and reconstruction in channels-last memory format (on a copy of the
            original; about 1.4x faster on a CPU at 224 px); the model comes back contiguous.
    """

    num_images: int | None = 2048
    steps: Sequence[str] = DEFAULT_STEPS
    iterations: int | None = None
    lr: float = RECONSTRUCT_LR
    previous: bool = True
    ridge: float = 1e-3
    batch_size: int = 64
    preset: str | None = None
    transform: object = None
    seed: int = 0
    after: int = 0
    bf16: bool = False
    channels_last: bool = True


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    """How `finetune` trains the converted model to reproduce the original.

    Args:
        objective: "logits" is knowledge distillation (KL at ``temperature``, scaled by T^2); "features" makes
            the student reproduce the teacher's feature map before global pooling (MSE relative to its mean
            square, the classifier frozen; MiR, Wang et al. 2022), which works from a few hundred unlabelled
            images; "both" adds the two.
        epochs: the budget in passes over the data.
        steps: the budget in optimizer steps instead (as many passes as they need).
        augment: "cifar" (pad-crop + flip), "imagenet" (random resized crop + flip), "auto" (none for
            "logits", else "cifar" up to 64x64 images and "imagenet" above) or "none": varies the images that
            a small set shows many times.
        lr: peak learning rate of the cosine schedule over the budget (None: the optimizer's default).
        optimizer: "sgd" (momentum 0.9, Nesterov; default lr 0.01; the default for "logits") or "adamw"
            (default lr 3e-4; the default for "features"/"both").
        weight_decay: the optimizer's weight decay.
        temperature: the distillation temperature.
        alpha: the weight of the distillation term when the data has labels (the rest is cross-entropy).
        freeze: "rewritten" trains only the blocks the recipe rewrote; "none" the whole model.
        train_norms: norms normalise with batch statistics and update their running ones (default for
            "logits"), or keep their statistics and train only their affine (default for "features"/"both").
        max_steps: stop early (the schedule still spans the budget).
        num_images: train on a seeded subset of that many images.
        batch_size: images per batch, per process.
        preset: the preprocessing preset of a path (None: see ``transform``).
        transform: the preprocessing of a path's images (None: by the rule of `preprocessing`).
        seed: seed of the subset, the shuffling and the augmentation.
        bf16: run the forward passes under bfloat16 autocast.
        channels_last: train in channels-last memory format (the result comes back contiguous).
        guard: return the input when training left the objective's error worse; False returns the finite
            trained model all the same, for a caller that judges it on held-back images, as `recover` does.
    """

    objective: str = "logits"
    epochs: int = 1
    steps: int | None = None
    augment: str = "none"
    lr: float | None = None
    optimizer: str | None = None
    weight_decay: float = 0.0
    temperature: float = 4.0
    alpha: float = 0.9
    freeze: str = "none"
    train_norms: bool | None = None
    max_steps: int | None = None
    num_images: int | None = None
    batch_size: int = 64
    preset: str | None = None
    transform: object = None
    seed: int = 0
    bf16: bool = False
    channels_last: bool = False
    guard: bool = True
