"""What `recover` did: one row per stage (the held-back gap after it, what it cost) and a chart of the gap
against the seconds spent."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from ..atomic import atomic_file
from ..errors import SurgeryError

__all__ = ["RecoveryReport", "RecoveryStage", "format_seconds"]


@dataclasses.dataclass
class RecoveryStage:
    """One stage of `recover`, measured on the held-back images after it.

    Args:
        stage: "naive copy", "bn", "calibrate", "features" or "finetune".
        budget: what the stage ran ("2048 images", "500 steps").
        cpu_seconds: process CPU time of the stage, its measurement included (all threads).
        wall_seconds: its wall time.
        gap: points below the original: top-1 with labels, else disagreement (100 - agreement).
        top1: top-1 on the held-back images (None without labels).
        agreement: top-1 agreement with the original, percent.
        kl: mean KL(original || model).
        kept: False when the stage left the model worse and was undone (its cost still counts).
        total_cpu_seconds: CPU seconds of the whole recovery up to the end of this stage.
        total_wall_seconds: wall seconds likewise.
    """

    stage: str
    budget: str
    cpu_seconds: float
    wall_seconds: float
    gap: float
    top1: float | None
    agreement: float
    kl: float
    kept: bool = True
    total_cpu_seconds: float = 0.0
    total_wall_seconds: float = 0.0

    @classmethod
    def from_dict(cls, data: dict, where: str) -> RecoveryStage:
        """A stage read back from a checkpoint, every field checked.

        Args:
            data: what `dataclasses.asdict` wrote.
            where: how an error names the file.

        Returns:
            RecoveryStage: the stage.

        Raises:
            SurgeryError: a missing, extra, mistyped or non-finite field.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) != set(fields):
            raise SurgeryError(f"{where} holds a stage that is not a recover stage; start fresh with --force")
        for name, value in data.items():
            number = isinstance(value, int | float) and not isinstance(value, bool)
            ok = {"stage": isinstance(value, str), "budget": isinstance(value, str), "kept": isinstance(value, bool),
                  "top1": value is None or (number and math.isfinite(value))}.get(name, number and math.isfinite(value))
            if not ok:
                raise SurgeryError(f"{where}: the stage's {name} is {value!r}; start fresh with --force")
        return cls(**data)


@dataclasses.dataclass
class RecoveryReport:
    """What `recover` did and why it stopped.

    Args:
        target: the gap to reach, in points (None: none; run until the budget or a stage stops paying).
        budget_seconds: the wall-time budget (None: none).
        metric: "top-1" (labels: the gap is top-1 points below the original) or "agreement" (no labels: the gap
            is the percentage of held-back images where the model's class differs from the original's).
        eval_images: held-back images every stage is measured on (never trained on).
        original_top1: the original's top-1 on them (None without labels).
        stages: the naive copy, then every stage run, in order.
        stopped: why it stopped ("target met", "budget spent", "stopped paying", "all stages run").
        met: whether the target was met.
    """

    target: float | None
    budget_seconds: float | None
    metric: str
    eval_images: int
    original_top1: float | None
    stages: list[RecoveryStage] = dataclasses.field(default_factory=list)
    stopped: str = ""
    met: bool = False

    @property
    def gap(self) -> float:
        """The gap of the model `recover` returned: the best kept stage's."""
        return self.best.gap

    @property
    def best(self) -> RecoveryStage:
        """The last kept stage: what the returned model measured."""
        return [s for s in self.stages if s.kept][-1]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        what = "top-1 points below the original" if self.metric == "top-1" else "% of images the original classes otherwise"
        lines = [f"{'stage':<11} {'budget':<20} {'gap':>6} {'top-1':>6} {'agree':>7} {'KL':>7} {'wall s':>8} {'cpu s':>8}"]
        for s in self.stages:
            top1 = f"{s.top1:.2f}" if s.top1 is not None else "-"
            undone = "" if s.kept else "  (undone: worse)"
            lines.append(f"{s.stage:<11} {s.budget:<20} {s.gap:>6.2f} {top1:>6} {s.agreement:>6.2f}% {s.kl:>7.4f} "
                         f"{s.total_wall_seconds:>8.1f} {s.total_cpu_seconds:>8.1f}{undone}")
        target = f"target {self.target:g}" if self.target is not None else "no target"
        budget = f"budget {format_seconds(self.budget_seconds)}" if self.budget_seconds is not None else "no budget"
        lines.append(f"gap = {what}, on {self.eval_images} held-back images; {target}, {budget}; "
                     f"stopped: {self.stopped}; final gap {self.gap:.2f}" + (" (met)" if self.met else ""))
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike, *, force: bool = True) -> Path:
        """Write a PNG: the gap after every stage against the wall seconds spent, the target as a line.

        Args:
            path: the PNG to write.
            force: overwrite ``path`` if it exists.

        Returns:
            ``path``.
        """
        import matplotlib  # slow to import; Agg only for whoever plots

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        x = [s.total_wall_seconds for s in self.stages]
        ax.plot(x, [s.gap for s in self.stages], color="0.6", lw=1, zorder=1)
        for i, s in enumerate(self.stages):
            ax.scatter(s.total_wall_seconds, s.gap, marker="o" if s.kept else "x", color="C0" if s.kept else "C3",
                       zorder=2)
            label = "naive" if s.stage == "naive copy" else f"{s.stage}\n{s.budget}"
            # Alternate above and below: rounds of one stage often end close together.
            ax.annotate(label, (s.total_wall_seconds, s.gap), xytext=(4, 6 if i % 2 == 0 else -18),
                        textcoords="offset points", fontsize=7)
        if self.target is not None:
            ax.axhline(self.target, color="C2", ls="--", lw=1, label=f"target {self.target:g}")
            ax.legend(fontsize=8)
        ax.set_xlabel("wall seconds spent")
        ax.set_ylabel("top-1 points below the original" if self.metric == "top-1" else "disagreement with the original (%)")
        ax.set_title(f"recover: {self.stopped} (x = stage undone)", fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_file(path, force=force) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        return Path(path)


def format_seconds(seconds: float) -> str:
    """``seconds`` as people write a duration: "45s", "12m30s", "1h05m".

    Args:
        seconds: a duration.

    Returns:
        str: the duration.
    """
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
