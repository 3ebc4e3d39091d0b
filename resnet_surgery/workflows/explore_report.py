"""What explore found: every candidate's accuracy and latency against the original, as a table, a dict and a
chart, and the Pareto front of latency and accuracy."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from ..arguments import checked_arguments
from ..utils import table
from .explore_plot import plot_explore

__all__ = ["ExploreReport", "pareto_front"]


@dataclasses.dataclass
class ExploreReport:
    """Every candidate's accuracy and latency against the original, and the Pareto front per batch size."""

    model: str
    metric: str  # "top1" (the held-out images have labels) or "agreement" (with the original)
    settings: dict
    candidates: list[dict]  # one per candidate: how it was made, its evaluation, latency and front per batch
    latency: dict | None  # LatencyReport.to_dict() of the one timing run
    seconds: float  # this call, reused candidates included at no cost
    latency_seconds: float = 0.0  # the timing run alone

    def work_seconds(self) -> float:
        """What a run from scratch costs: every candidate's recorded build time plus the timing run."""
        return sum(c.get("seconds", 0.0) for c in self.candidates) + self.latency_seconds

    def timed(self) -> list[dict]:
        return [c for c in self.candidates if c.get("latency")]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        batches = self.latency["batch_sizes"] if self.latency else []
        head = ["candidate", "precision", "exact", "MMACs", "top-1 %", "agree %", "KL"]
        for b in batches:
            head += [f"p50 ms b{b}", f"ratio b{b} [95% CI]", f"front b{b}"]
        rows = [head]
        for c in self.timed():
            ev = c["eval"]
            row = [c["name"], _precision(c), "yes" if c["exact"] else "no", _num(c["macs"], 1e-6, "{:.1f}"),
                   _num(ev["top1"], 1, "{:.2f}"), _num(ev["agreement"], 1, "{:.2f}"), _num(ev["kl"], 1, "{:.4f}")]
            for b in batches:
                lat = c["latency"][str(b)]
                row += [f"{lat['p50_ms']:.3f}", f"{lat['ratio']:.3f} [{lat['ratio_low']:.3f}, {lat['ratio_high']:.3f}]",
                        "*" if c["pareto"][str(b)] else ""]
            rows.append(row)
        lines = [f"explore {self.model}: accuracy on {self.settings['eval_images']} held-out images "
                 f"({'top-1 with labels' if self.metric == 'top1' else 'agreement with the original: no labels'}), "
                 "latency in one interleaved onnxruntime run"]
        lines += table(rows)
        lines.append("ratio = median latency / the original's (below 1 is faster); front: on the Pareto front "
                     f"of latency ratio and {'top-1' if self.metric == 'top1' else 'agreement'}")
        lines += [f"{c['name']}: {c['status']}" for c in self.candidates if c["status"] != "ok"]
        if self.latency:
            lines += [f"warning: {w}" for w in self.latency["warnings"]]
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike, *, force: bool = True) -> Path:
        """A PNG per batch size: latency ratio (x) against accuracy (y), points numbered with a key, the front drawn.

        Args:
            path: the PNG to write.
            force: replace an existing file.

        Returns:
            The path written.
        """
        return plot_explore(self, path, force=force)


def _precision(c: dict) -> str:
    """"fp32", or "int8 w7" / "int8 w8": the weights' bits (7 with reduce_range, which AVX2-only CPUs need)."""
    return f"int8 w{7 if c['quantization'].get('reduce_range') else 8}" if c["precision"] == "int8" else c["precision"]


def _num(value, scale: float, fmt: str) -> str:
    return "-" if value is None else fmt.format(value * scale)


@checked_arguments
def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (cost, value) points: True where no other point costs at most as much and is worth at least as
    much, and is strictly better in one of the two.

    Args:
        points: (cost, value) pairs, e.g. (latency ratio, top-1).

    Returns:
        For each point in order, whether it is on the Pareto front.

    Raises:
        TypeError: ``points`` is not a sequence of (cost, value) pairs of numbers.
    """
    return [not any(c2 <= c and v2 >= v and (c2 < c or v2 > v) for c2, v2 in points) for c, v in points]
