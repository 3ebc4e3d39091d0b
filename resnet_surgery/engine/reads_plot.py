"""A picture of what each downsampling conv reads: one panel per site, one column per variant of a model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..arguments import checked_arguments
from ..atomic import atomic_file
from ..errors import SurgeryError
from .reads import ConvReads, SiteReads, dead_text, overlap_max, site_title

__all__ = ["plot_sites"]

PANEL_WIDTH = 2.25  # inches per pattern
PANEL_HEIGHT = 3.1  # inches per site row: title, patterns, two lines of text under them


def _short(name: str, block: str) -> str:
    """A module's name inside its block ("conv1" for "layer2.0.conv1"), to keep titles inside their panel."""
    return name[len(block) + 1:] if name.startswith(block + ".") else name


def _draw_pattern(ax, c: ConvReads, block: str, vmax: int) -> None:
    ax.imshow(np.ma.masked_equal(c.count, 0), cmap="Blues", vmin=-1, vmax=vmax + 1, interpolation="nearest")
    ax.set_facecolor("#f2f2f2")  # never read: light grey, marked "o"
    for (i, j), n in np.ndenumerate(c.count):
        ax.text(j, i, str(n) if n else "o", ha="center", va="center", fontsize=7,
                color="#999999" if not n else "white" if n > vmax / 2 else "black")
    rows, cols = c.count.shape
    ax.set_xticks(np.arange(-0.5, cols), minor=True)
    ax.set_yticks(np.arange(-0.5, rows), minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
    ax.set_title(f"{c.branch}\n{_short(c.name, block)}\n{c.shape}, reads {c.fraction:.0%}", fontsize=8)


def _draw_site(sub, site: SiteReads | None, vmax: int, n_patterns: int) -> None:
    axes = sub.subplots(1, n_patterns, squeeze=False)[0]
    for ax in axes:
        ax.set_axis_off()
    if site is None:
        return
    sub.suptitle(site_title(site), fontsize=10, fontweight="bold")
    for ax, c in zip(axes, site.convs):
        ax.set_axis_on()
        _draw_pattern(ax, c, site.block, vmax)
    lines = [dead_text(site)]
    if site.moved_to:
        lines.append(site.moved_to.replace(" = ", " =\n"))
    sub.text(0.5, 0.03, "\n".join(lines), ha="center", va="bottom", fontsize=8)


@checked_arguments
def plot_sites(columns: list[SiteReads] | list[list[SiteReads]], path: str | os.PathLike,
               labels: list[str] | None = None, *, force: bool = True) -> Path:
    """Write a PNG: for each downsampling site, the read pattern of each strided module of its block.

    Args:
        columns: ``site_reads`` of one model, or a list of them (variants of one model side by side, one
            column each; row i holds each variant's i-th downsampling site).
        path: the PNG to write (atomically).
        labels: a title per column (default: "model 1", "model 2", ...).
        force: replace an existing file.

    Returns:
        The path written.

    Raises:
        SurgeryError: no sites to plot, or ``path`` exists and ``force`` is False, or cannot be written.
        TypeError: ``columns`` is not a list of SiteReads (or of such lists), or another argument of the
            wrong type.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if columns and isinstance(columns[0], SiteReads):
        columns = [columns]
    if not any(columns):  # site_reads' answer for a model without a downsampling block
        raise SurgeryError("no sites to plot: site_reads found no downsampling block in the model")
    labels = list(labels) if labels else [f"model {i + 1}" for i in range(len(columns))]
    n_rows = max((len(sites) for sites in columns), default=0) or 1
    n_patterns = max((len(s.convs) for sites in columns for s in sites), default=1) or 1
    vmax = overlap_max(columns)
    fig = plt.figure(figsize=(PANEL_WIDTH * n_patterns * len(columns) + 0.4, PANEL_HEIGHT * n_rows + 0.9))
    # Three bands, so that nothing overlaps: column labels, the site panels, a key.
    head, body, foot = fig.subfigures(3, 1, height_ratios=[0.45, PANEL_HEIGHT * n_rows, 0.45])
    grid = body.subfigures(n_rows, len(columns), squeeze=False, wspace=0.02, hspace=0.02)
    for j, (sites, label) in enumerate(zip(columns, labels)):
        head.text((j + 0.5) / len(columns), 0.4, label, ha="center", va="center", fontsize=13,
                  fontweight="bold", color="#1f4e79")
        for i in range(n_rows):
            _draw_site(grid[i][j], sites[i] if i < len(sites) else None, vmax, n_patterns)
            grid[i][j].subplots_adjust(top=0.76, bottom=0.25, left=0.04, right=0.96, wspace=0.3)
    foot.text(0.5, 0.5, "Top-left patch of each strided module's input. Number: how many output positions read "
              "that input position (overlap); o: never read.", ha="center", va="center", fontsize=9)
    with atomic_file(path, force) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)
