"""What explore found: every candidate's accuracy and latency against the original, as a table, a dict and a
chart, and the Pareto front of latency and accuracy."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from ..arguments import checked_arguments
from ..utils import table
from .explore_plot import plot_explore

__all__ = ["Candidate", "ExploreReport", "pareto_front"]


@dataclasses.dataclass
class Candidate:
    """One model `explore` built (or skipped): what it is, how it scored and how fast it ran.

    Args:
        name: "original", a variant ("v1", "d", ...) or its int8 file ("d-int8").
        precision: "fp32" or "int8".
        status: "ok", or why it was skipped or rejected ("skipped: ...", "rejected: ...").
        variant: the layout it has.
        exact: whether every rewrite that made it preserves the function.
        rewrites: how many blocks were rewritten.
        macs: multiply-accumulates per image.
        eval: its evaluation on the held-out images (`EvalReport.to_dict()`: top1, agreement, kl, ...).
        latency: per batch size (a string key): p50_ms, p90_ms, ratio to the original and its 95% interval.
        pareto: per batch size: whether it is on the Pareto front of latency ratio and accuracy.
        parity: the fp32 file's parity against PyTorch.
        quantization: the int8 file's report (`QuantReport.to_dict()`).
        seconds: what building it took (recorded when it was built; a rerun reuses it at no cost).
        details: the rest of its result.json: how it was made (its recovery), the settings, its source.
    """

    name: str
    precision: str
    status: str
    variant: str | None = None
    exact: bool | None = None
    rewrites: int | None = None
    macs: int | None = None
    eval: dict | None = None
    latency: dict | None = None
    pareto: dict | None = None
    parity: dict | None = None
    quantization: dict | None = None
    seconds: float = 0.0
    details: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, result: dict) -> Candidate:
        """A candidate from its result (as result.json holds it): the fields by name, the rest in ``details``.

        Args:
            result: the candidate's result.

        Returns:
            The candidate.
        """
        names = {f.name for f in dataclasses.fields(cls)} - {"details"}
        return cls(**{k: v for k, v in result.items() if k in names},
                   details={k: v for k, v in result.items() if k not in names})

    def to_dict(self) -> dict:
        """The result as plain data (explore.json): the fields set, and ``details`` merged in."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "details" and v is not None}
        return {**fields, **copy.deepcopy(self.details)}


@dataclasses.dataclass
class ExploreReport:
    """Every candidate's accuracy and latency against the original, and the Pareto front per batch size.

    Args:
        model: the model's name.
        metric: "top1" (the held-out images have labels) or "agreement" (with the original).
        settings: what explore was asked (a rerun with the same settings reuses the candidates).
        candidates: one per candidate, in the order built.
        latency: `LatencyReport.to_dict()` of the one timing run, or None when nothing was timed.
        seconds: this call, reused candidates included at no cost.
        latency_seconds: the timing run alone.
    """

    model: str
    metric: str
    settings: dict
    candidates: list[Candidate]
    latency: dict | None
    seconds: float
    latency_seconds: float = 0.0

    def work_seconds(self) -> float:
        """What a run from scratch costs: every candidate's recorded build time plus the timing run."""
        return sum(c.seconds for c in self.candidates) + self.latency_seconds

    def timed(self) -> list[Candidate]:
        """The candidates that were timed (built and kept)."""
        return [c for c in self.candidates if c.latency]

    def to_dict(self) -> dict:
        """The report as plain data (explore.json)."""
        return {**{f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)},
                "candidates": [c.to_dict() for c in self.candidates]}

    def __str__(self) -> str:
        batches = self.latency["batch_sizes"] if self.latency else []
        head = ["candidate", "precision", "exact", "MMACs", "top-1 %", "agree %", "KL"]
        for b in batches:
            head += [f"p50 ms b{b}", f"ratio b{b} [95% CI]", f"front b{b}"]
        rows = [head]
        for c in self.timed():
            ev = c.eval
            row = [c.name, _precision(c), "yes" if c.exact else "no", _num(c.macs, 1e-6, "{:.1f}"),
                   _num(ev["top1"], 1, "{:.2f}"), _num(ev["agreement"], 1, "{:.2f}"), _num(ev["kl"], 1, "{:.4f}")]
            for b in batches:
                lat = c.latency[str(b)]
                row += [f"{lat['p50_ms']:.3f}", f"{lat['ratio']:.3f} [{lat['ratio_low']:.3f}, {lat['ratio_high']:.3f}]",
                        "*" if c.pareto[str(b)] else ""]
            rows.append(row)
        lines = [f"explore {self.model}: accuracy on {self.settings['eval_images']} held-out images "
                 f"({'top-1 with labels' if self.metric == 'top1' else 'agreement with the original: no labels'}), "
                 "latency in one interleaved onnxruntime run"]
        lines += table(rows)
        lines.append("ratio = median latency / the original's (below 1 is faster); front: on the Pareto front "
                     f"of latency ratio and {'top-1' if self.metric == 'top1' else 'agreement'}")
        lines += [f"{c.name}: {c.status}" for c in self.candidates if c.status != "ok"]
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


def _precision(c: Candidate) -> str:
    """"fp32", or "int8 w7" / "int8 w8": the weights' bits (7 with reduce_range, which AVX2-only CPUs need)."""
    return f"int8 w{7 if c.quantization.get('reduce_range') else 8}" if c.precision == "int8" else c.precision


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
