"""A PNG of latency distributions: one box per model, one panel per batch size."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..atomic import atomic_file

__all__ = ["plot_latency"]


def plot_latency(timings_s: dict[str, dict[int, list[float]]], batch_sizes: list[int], title: str,
                 path: str | os.PathLike, *, force: bool = True) -> Path:
    """Write a PNG of the latency distributions: one box per model, one panel per batch size.

    Args:
        timings_s: model -> batch -> seconds per run.
        batch_sizes: one panel each.
        title: the figure's title (the machine and settings).
        path: the PNG to write.
        force: overwrite ``path`` if it exists.

    Returns:
        ``path``.
    """
    # Imported here: matplotlib is slow to import, and the Agg backend must not be forced on whoever imports the
    # package (only on the one who plots, who needs no display).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(timings_s)
    fig, axes = plt.subplots(
        1,
        len(batch_sizes),
        figsize=(max(4.5, 1.6 * len(names)) * len(batch_sizes), 4.5),
        squeeze=False,
    )
    for ax, batch in zip(axes[0], batch_sizes):
        data = [np.asarray(timings_s[n][batch]) * 1e3 for n in names]
        # Whiskers at p1/p99 and no fliers: a few scheduler hiccups would otherwise squash the boxes.
        ax.boxplot(data, tick_labels=names, showfliers=False, whis=(1, 99))
        for i, d in enumerate(data, start=1):
            ax.annotate(
                f"{np.median(d):.3g}",
                (i, np.median(d)),
                xytext=(24, 0),
                textcoords="offset points",
                fontsize=8,
                va="center",
            )
        ax.set_title(f"batch {batch}")
        ax.set_ylabel("latency per run (ms)")
        ax.tick_params(axis="x", labelrotation=20)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.045 * (title.count("\n") + 1)))  # room for every line of the title
    with atomic_file(path, force) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)
