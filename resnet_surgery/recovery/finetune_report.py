"""What a fine-tuning run did: its steps, losses, time, and whether the trained model was kept."""

from __future__ import annotations

import dataclasses
import math

__all__ = ["FinetuneReport"]


@dataclasses.dataclass
class FinetuneReport:
    """What `finetune` did: the budget, the steps and images of this run, and its loss curve.

    Args:
        epochs: passes over the data the budget spans.
        start_epoch: epochs already done when this run started (from a resumed checkpoint).
        steps: optimizer steps this run took.
        images: training images this run saw, all processes together.
        world_size: processes.
        distill_losses: distillation loss of every step (mean over processes).
        epoch_losses: mean distillation loss of each epoch this run completed.
        cpu_seconds: this process's CPU time, all threads.
        wall_seconds: wall time.
        checkpoint: the checkpoint path, or None.
        objective: "logits", "features" or "both".
        budget_steps: optimizer steps the schedule spans.
        features: where the matched feature map was found ("input of relu_15.mean((2, 3)) at node mean").
        error_before: the objective's error of the input (see `guard`), error_after: the trained model's.
        kept: "trained", or "input (...)" when training made the error worse and the input was returned.
    """

    epochs: int
    start_epoch: int  # epochs already done when this run started (from a resumed checkpoint)
    steps: int  # optimizer steps this run took
    images: int  # training images this run saw, all processes together
    world_size: int
    distill_losses: list[float]  # distillation loss of every step (mean over processes)
    epoch_losses: list[float]  # mean distillation loss of each epoch this run completed
    cpu_seconds: float  # this process's CPU time, all threads
    wall_seconds: float
    checkpoint: str | None
    objective: str = "logits"
    budget_steps: int = 0  # optimizer steps the schedule spans
    features: str | None = None  # the feature map that "features"/"both" match, as found in the graph
    error_before: float = math.nan
    error_after: float = math.nan
    kept: str = "trained"

    @property
    def loss_start(self) -> float | None:
        """The mean loss of this run's first quarter of steps; None when it took none (resumed after the budget)."""
        k = max(1, len(self.distill_losses) // 4)
        return sum(self.distill_losses[:k]) / k if self.distill_losses else None

    @property
    def loss_end(self) -> float | None:
        """The mean loss of this run's last quarter of steps; None when it took none."""
        k = max(1, len(self.distill_losses) // 4)
        return sum(self.distill_losses[-k:]) / k if self.distill_losses else None

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "loss_start": self.loss_start, "loss_end": self.loss_end}

    def __str__(self) -> str:
        return (
            f"epochs {self.start_epoch}->{self.start_epoch + len(self.epoch_losses)} of {self.epochs}, "
            f"{self.steps} steps, {self.images} images on {self.world_size} process(es): {self.objective} loss "
            + (f"{self.loss_start:.4f} -> {self.loss_end:.4f}" if self.distill_losses else "- (no step left)")
            + f" ({self.cpu_seconds:.0f} CPU s, {self.wall_seconds:.0f} s); "
            f"error {self.error_before:.4f} -> {self.error_after:.4f}, kept {self.kept}"
            + (f"; features: {self.features}" if self.features else "")
        )
