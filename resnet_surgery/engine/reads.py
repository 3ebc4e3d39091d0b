"""What each downsampling conv reads: the read pattern of every strided module of a downsampling block, as data.

For each downsampling site (a residual block with stride > 1, found from the fx graph), every strided module
on its main path and shortcut (conv, pooling, Subsample) gets a boolean array over a small patch of its input
grid (True: read by at least one output position) and a count array (how many output positions read it:
overlap). Both come from the module's own kernel, stride, dilation, padding (and ceil_mode for pooling), never
from its name. A v1 site also says where Kaiming's equivalence moves its stride to remove the dead MACs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import takewhile
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..arguments import checked_arguments
from ..errors import SurgeryError
from ..utils import eval_mode, model_device
from .blocks import find_trunk, pool_module
from .layers import Subsample

if TYPE_CHECKING:
    from .inspect import Report

__all__ = ["ConvReads", "SiteReads", "axis_counts", "dead_text", "grid_text", "overlap_max", "read_counts", "site_reads",
           "site_title"]

READERS = (nn.Conv2d, nn.AvgPool2d, nn.MaxPool2d, Subsample)


@dataclass
class ConvReads:
    """The read pattern of one strided module on the top-left ``patch`` x ``patch`` positions of its input."""

    name: str  # full module path, e.g. "layer2.0.conv1"
    branch: str  # "main" | "shortcut"
    kind: str  # the module's class: Conv2d, AvgPool2d, MaxPool2d, Subsample
    kernel: int
    stride: int
    dilation: int
    padding: int
    read: np.ndarray = field(repr=False)  # bool, True: read by at least one output position
    count: np.ndarray = field(repr=False)  # int, how many output positions read each input position
    fraction: float = 0.0  # of the whole input (all rows and columns), as `inspect` reports it

    @property
    def shape(self) -> str:
        """Kernel and stride in a few characters: "1x1/s2", "3x3/s2/d2", "pool 2x2/s2"."""
        pool = "pool " if "Pool" in self.kind else "subsample " if self.kind == "Subsample" else ""
        dil = f"/d{self.dilation}" if self.dilation > 1 else ""
        return f"{pool}{self.kernel}x{self.kernel}/s{self.stride}{dil}"


@dataclass
class SiteReads:
    """One downsampling block: what its strided modules read, and what the block before spends for nobody."""

    block: str
    before: str | None  # the block before it in the model's block order
    convs: list[ConvReads]
    dead_macs: int  # MACs the block before spends on positions nobody reads (0: none)
    moved_to: str | None  # Kaiming's equivalence: "stride 2 on layer2.0.conv1 = stride 2 on layer1.2.conv2"


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def axis_counts(size: int, kernel: int, stride: int, padding: int = 0, dilation: int = 1,
                ceil_mode: bool = False) -> np.ndarray:
    """How many output positions read each of ``size`` input positions along one axis (PyTorch's output size).

    Args:
        size: input length along the axis.
        kernel, stride, padding, dilation: the module's values along that axis (zero padding is never counted).
        ceil_mode: pooling's rounding up of the output length.

    Returns:
        An int array of length ``size``; 0 where no output position reads the input position.
    """
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1  # PyTorch drops a last window that would start in the right padding
    taps = (np.arange(max(out, 0))[:, None] * stride - padding + np.arange(kernel)[None, :] * dilation).ravel()
    return np.bincount(taps[(taps >= 0) & (taps < size)], minlength=size)


def _module_params(m: nn.Module) -> tuple[tuple[int, int], ...]:
    """(kernel, stride, padding, dilation) of a reader, each as (rows, columns)."""
    if isinstance(m, Subsample):
        return (1, 1), _pair(m.stride), (0, 0), (1, 1)
    stride = m.stride if m.stride is not None else m.kernel_size  # pooling's default stride is its kernel
    padding = (0, 0) if m.padding == "valid" else _pair(m.padding)  # a strided conv cannot pad "same"
    return _pair(m.kernel_size), _pair(stride), padding, _pair(getattr(m, "dilation", 1))


def read_counts(m: nn.Module, height: int, width: int) -> np.ndarray:
    """How many output positions of ``m`` read each position of a ``height`` x ``width`` input.

    Args:
        m: a Conv2d, AvgPool2d, MaxPool2d or Subsample.
        height, width: its input's spatial size.

    Returns:
        An int array of shape (height, width).
    """
    kernel, stride, padding, dilation = _module_params(m)
    ceil = bool(getattr(m, "ceil_mode", False))
    rows = axis_counts(height, kernel[0], stride[0], padding[0], dilation[0], ceil)
    cols = axis_counts(width, kernel[1], stride[1], padding[1], dilation[1], ceil)
    return np.outer(rows, cols)


def _conv_reads(name: str, branch: str, m: nn.Module, size: tuple[int, int], patch: int) -> ConvReads:
    count = read_counts(m, *size)
    kernel, stride, padding, dilation = _module_params(m)
    crop = count[:patch, :patch]
    return ConvReads(name, branch, type(m).__name__, kernel[0], stride[0], dilation[0], padding[0],
                     crop > 0, crop, float((count > 0).mean()))


def _strided(node, modules) -> nn.Module | None:
    # A functional pool (F.max_pool2d(x, 3, 2, 1)) reads like the module it equals.
    m = modules.get(node.target) if node.op == "call_module" else pool_module(node)
    if isinstance(m, READERS) and max(_module_params(m)[1]) > 1:
        return m
    return None


def _moved_to(reads: list[ConvReads], dead) -> str | None:
    """Kaiming's equivalence for a site whose input nobody reads in full: the strided 1x1 on the main path
    equals the same stride on the conv(s) that the prune pass doubles the stride of (the block before's kxk)."""
    if dead is None or not dead.absorbed:
        return None
    main = next((c for c in reads if c.branch == "main" and c.kind == "Conv2d"), None)
    if main is None:
        return None
    return f"stride {main.stride} on {main.name} = " + ", ".join(f"stride {main.stride} on {a}" for a in dead.absorbed)


@checked_arguments
def site_reads(model: nn.Module, report: Report, *, leaf_modules=(), patch: int = 6) -> list[SiteReads]:
    """The read pattern of every strided module of each downsampling block of ``model``.

    Args:
        model: the model ``report`` describes; it is not changed (eval mode and no gradients while measuring).
        report: ``inspect(model, input_size)``: its input size sets the grid each module reads, its dead sites
            the MACs nobody needs and where the stride moves.
        leaf_modules: as for ``inspect``.
        patch: rows and columns of the top-left patch of each module's input to keep (at most the input's).

    Returns:
        One SiteReads per downsampling block, in the model's block order.

    Raises:
        SurgeryError: ``model`` holds no residual block, or ``report`` is not of this model (other blocks).
        TraceError: fx cannot trace ``model``, nor one submodule holding its blocks (see `find_trunk`).
        TypeError: ``report`` is not an `inspect` report, or ``patch`` is not an int.
    """
    if not all(hasattr(report, a) for a in ("input_size", "blocks", "dead")):  # Report: inspect imports this module
        raise TypeError(f"site_reads(): report takes a Report, got {report!r:.60}; make it with inspect(model, input_size)")
    trunk = find_trunk(model, leaf_modules)
    with eval_mode(trunk.module), torch.no_grad():
        ShapeProp(trunk.gm).propagate(torch.zeros(1, *report.input_size, device=model_device(trunk.module)))
    names = [b.name for b in trunk.blocks]
    if names != [b.name for b in report.blocks]:
        raise SurgeryError(f"the report is not of this model: its blocks are {[b.name for b in report.blocks]}, "
                           f"the model's {names}")
    modules = dict(trunk.gm.named_modules())
    dead = {d.block: d for d in report.dead}
    sites = []
    for i, block in enumerate(trunk.blocks):
        if not block.downsamples:
            continue
        reads = []
        for branch, nodes in (("main", block.main), ("shortcut", block.shortcut)):
            for node in nodes:
                if (m := _strided(node, modules)) is not None:
                    size = tuple(node.args[0].meta["tensor_meta"].shape[2:4])
                    name = node.target if node.op == "call_module" else node.name
                    reads.append(_conv_reads(trunk.path(name), branch, m, size, patch))
        site = dead.get(block.name)
        sites.append(SiteReads(block.name, names[i - 1] if i else None, reads, site.dead_macs if site else 0,
                               _moved_to(reads, site)))
    return sites


def site_title(site: SiteReads) -> str:
    """The block's name, with where its main path sits when the name is an add node's ("add_2 (layer1.2)":
    a pruned model's shortcut Subsample sits at the top level, so the modules share no prefix)."""
    if any(c.name.startswith(site.block + ".") for c in site.convs):
        return site.block
    parts = [c.name.split(".")[:-1] for c in site.convs if c.branch == "main"]
    prefix = ".".join(p[0] for p in takewhile(lambda level: len(set(level)) == 1, zip(*parts)))
    return f"{site.block} ({prefix})" if prefix else site.block


def _pattern_lines(c: ConvReads) -> list[str]:
    # How many output positions read each input position, as the figure colours it: "." never, "+" ten or more.
    return [" ".join("." if n == 0 else str(n) if n < 10 else "+" for n in row) for row in c.count]


@checked_arguments
def grid_text(sites: list[SiteReads]) -> str:
    """Each site's read counts as characters (how many output positions read each input position, as the figure
    colours them; ".": never read), the patterns of one site side by side.

    Args:
        sites: from ``site_reads``.

    Returns:
        A few lines per site: the block, its dead MACs and ``moved_to``, then per strided module its name,
        kernel/stride and fraction read above its pattern.

    Raises:
        TypeError: ``sites`` is not a list of SiteReads.
    """
    lines = []
    for s in sites:
        lines.append(f"{site_title(s)}: " + (f"the block before ({s.before}) spends {s.dead_macs / 1e6:.1f} MMACs on "
                                       "positions nobody reads" if s.dead_macs else "no MACs upstream are spent on positions nobody reads"))
        if s.moved_to:
            lines.append(f"  {s.moved_to}")
        columns = [[c.name, f"{c.shape} reads {c.fraction:.0%}", *_pattern_lines(c)] for c in s.convs]
        widths = [max(map(len, col)) for col in columns]
        for row in range(max(map(len, columns), default=0)):
            cells = [col[row] if row < len(col) else "" for col in columns]
            lines.append("  " + "   ".join(t.ljust(w) for t, w in zip(cells, widths)).rstrip())
        lines.append("")
    return "\n".join(lines).rstrip() + "\n" if lines else "no downsampling blocks\n"


def overlap_max(columns: list[list[SiteReads]]) -> int:
    """The largest overlap count among all patterns (one colour scale for a whole figure)."""
    return max((int(c.count.max()) for sites in columns for s in sites for c in s.convs), default=1) or 1


def dead_text(site: SiteReads) -> str:
    """One line for under a site's patterns: what the block before spends for nobody."""
    if not site.dead_macs:
        return "no dead MACs upstream"
    return f"{site.before} spends {site.dead_macs / 1e6:.1f} MMACs on positions nobody reads"

