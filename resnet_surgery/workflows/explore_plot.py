"""explore's chart: latency ratio against accuracy per batch size, points numbered with a key so no label
lands on another."""

from __future__ import annotations

import os
from pathlib import Path

from ..atomic import atomic_file

__all__ = ["plot_explore"]


def plot_explore(report, path: str | os.PathLike, *, force: bool = True) -> Path:
    """Write a PNG with one panel per batch size: each candidate a numbered point (circle fp32, square int8,
    orange on the Pareto front) with its latency ratio's 95% CI, the front drawn, and a key of the numbers.

    Args:
        report: an ExploreReport (its ``timed()`` candidates, ``latency``, ``metric`` and ``model``).
        path: the PNG to write (atomically).
        force: replace an existing file.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = report.latency["batch_sizes"] if report.latency else []
    timed = report.timed()
    panels = max(1, len(batches))
    fig, axes = plt.subplots(1, panels + 1, figsize=(5.5 * panels + 3.2, 5), squeeze=False,
                             gridspec_kw={"width_ratios": [5.5] * panels + [3.2]})
    for ax, b in zip(axes[0], batches):
        _panel(ax, report, timed, b)
    _key(axes[0][-1], timed)
    m = (report.latency or {}).get("machine", {})
    fig.suptitle(f"{report.model}: circles fp32, squares int8; onnxruntime {m.get('onnxruntime', '')}, "
                 f"{(report.latency or {}).get('settings', {}).get('threads', '')} threads, {m.get('cpu', '')}",
                 fontsize=9)
    fig.tight_layout()
    for ax, b in zip(axes[0], batches):  # after the layout: labels are placed where they will be drawn
        _number(ax, [(c.latency[str(b)]["ratio"], c.eval[report.metric]) for c in timed])
    with atomic_file(path, force) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def _panel(ax, report, timed: list, batch: int) -> None:
    """One batch size: numbered points, their CIs and the Pareto front."""
    label = "top-1 (%)" if report.metric == "top1" else "top-1 agreement with the original (%)"
    points = [(c, c.latency[str(batch)], c.eval[report.metric]) for c in timed]
    for c, lat, acc in points:
        ax.errorbar(lat["ratio"], acc, xerr=[[lat["ratio"] - lat["ratio_low"]], [lat["ratio_high"] - lat["ratio"]]],
                    fmt="s" if c.precision == "int8" else "o", color="C1" if c.pareto[str(batch)] else "C0",
                    capsize=2)
    front = sorted((lat["ratio"], acc) for c, lat, acc in points if c.pareto[str(batch)])
    if front:
        ax.step(*zip(*front), where="post", color="C1", alpha=0.6, label="Pareto front")
        ax.legend(loc="lower right", fontsize=8)
    ax.margins(0.12)  # room for the numbers of points at the edges
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("median latency / original's (lower is faster; 95% CI)")
    ax.set_ylabel(label)
    ax.set_title(f"batch {batch}")
    ax.grid(alpha=0.3)


# Where a number may go beside its point (points right and up of it first), in points.
OFFSETS = [(4, 4), (4, -12), (-12, 4), (-12, -12), (4, 15), (4, -23), (-12, 15), (-12, -23), (14, -4), (-22, -4)]


def _number(ax, xy: list[tuple[float, float]]) -> None:
    """Number the points 1, 2, ...: each number takes the first offset whose box overlaps no number placed yet."""
    to_points = 72 / ax.figure.dpi
    boxes: list[tuple[float, float, float, float]] = []
    for number, (x, y) in enumerate(xy, 1):
        px, py = ax.transData.transform((x, y)) * to_points
        width, height = 5.5 * len(str(number)), 8.0
        for dx, dy in OFFSETS:
            box = (px + dx, py + dy, px + dx + width, py + dy + height)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
                break
        boxes.append(box)
        ax.annotate(str(number), (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=8, fontweight="bold")


def _key(ax, timed: list) -> None:
    """The numbers' key, one candidate a line."""
    ax.axis("off")
    lines = [f"{i:>2}  {c.name}" for i, c in enumerate(timed, 1)]
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8.5,
            transform=ax.transAxes)
