"""`inspect`: what a model's residual blocks look like, what they cost, and what they never read."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.flop_counter import FlopCounterMode

from ..arguments import checked_arguments
from ..history import history
from ..utils import check_model, eval_mode, image_size, model_device, model_runs_at, table
from ..vocab import Layout
from .blocks import dilated_note, find_trunk, model_variant
from .prune import dead_sites
from .reads import grid_text, site_reads
from .reads_plot import plot_sites

__all__ = [
    "BlockInfo", "DeadSite", "Report", "StridedConv", "count_macs", "inspect", "module_macs",
    "read_fraction",
]


@dataclass
class BlockInfo:
    """One residual block: its kind, stride and where it sits, its shortcut, shapes and MACs."""

    name: str
    kind: str  # bottleneck | basic | other
    stride: int
    stride_on: str | None  # Layout.stride_on: 1x1 (v1) | 3x3 (v1.5) | 3x3-dilated (exact v1) | n/a | other
    shortcut: str
    in_shape: list[int]
    out_shape: list[int]
    macs: int


@dataclass
class StridedConv:
    """A strided conv and the fraction of its input positions it ever reads."""

    name: str
    kernel: int
    stride: int
    dilation: int
    reads: float  # fraction of input positions the conv ever reads


@dataclass
class DeadSite:
    """A downsampling block whose input is read only at stride 2, and the MACs spent upstream on the rest."""

    block: str  # the downsampling block whose input is read only at stride 2
    dead_macs: int  # MACs spent upstream on positions nobody reads
    absorbed: list[str]


@dataclass
class Report:
    """What ``inspect`` found: variant, MACs, blocks, strided convs, dead computation and notes."""

    model: str
    input_size: list[int]
    variant: str
    macs: int
    blocks: list[BlockInfo]
    strided_convs: list[StridedConv]
    dead: list[DeadSite] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    trunk: str = ""  # the analysed submodule of a model fx cannot trace whole ("": the whole model)

    @property
    def dead_macs(self) -> int:
        return sum(d.dead_macs for d in self.dead)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dead_macs"] = self.dead_macs
        return d

    def __str__(self) -> str:
        size = "x".join(map(str, self.input_size))
        n_down = sum(b.stride > 1 for b in self.blocks)
        part = f" (trunk {self.trunk})" if self.trunk else ""
        lines = [f"{self.model}{part}: variant {self.variant}, {self.macs / 1e9:.3f} GMACs at {size}, "
                 f"{len(self.blocks)} residual blocks ({n_down} downsampling)", ""]
        rows = [("block", "kind", "stride", "stride on", "shortcut", "in -> out", "MMACs")]
        for b in self.blocks:
            shapes = f"{'x'.join(map(str, b.in_shape))} -> {'x'.join(map(str, b.out_shape))}"
            rows.append((b.name, b.kind, str(b.stride), b.stride_on or "-", b.shortcut, shapes, f"{b.macs / 1e6:.1f}"))
        lines += table(rows)
        lines += ["", "strided convolutions: fraction of input positions read"]
        rows = [("conv", "kernel", "stride", "dilation", "reads")]
        rows += [(c.name, f"{c.kernel}x{c.kernel}", str(c.stride), str(c.dilation), f"{c.reads:.0%}")
                 for c in self.strided_convs]
        lines += table(rows)
        lines.append("")
        if self.dead:
            lines.append(f"dead computation (positions nobody reads): {self.dead_macs / 1e9:.3f} GMACs "
                         f"({self.dead_macs / self.macs:.1%}); remove it exactly with convert --prune-dead")
            lines += table([("site", "dead MMACs", "computed in")] +
                           [(d.block, f"{d.dead_macs / 1e6:.1f}", ", ".join(d.absorbed)) for d in self.dead])
        else:
            lines.append("dead computation: none")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def grid(self, model: nn.Module, *, leaf_modules=(), patch: int = 6) -> str:
        """What each downsampling site reads, as characters (how many output positions read each input position; ".": never read), for a terminal.

        Args:
            model: the model this report describes (the report holds no paddings or pooling shortcuts).
            leaf_modules: as for ``inspect``.
            patch: rows and columns of each pattern.

        Returns:
            The text of ``grid_text``, a few lines per site.
        """
        return grid_text(site_reads(model, self, leaf_modules=leaf_modules, patch=patch))

    def plot(self, path: str | os.PathLike, model: nn.Module, *, compare=(), labels=None, leaf_modules=(),
             patch: int = 6, force: bool = True) -> Path:
        """Write a PNG of what each downsampling site reads; ``compare`` models (variants) side by side.

        Args:
            path: the PNG to write (atomically).
            model: the model this report describes.
            compare: other models to show beside it, inspected at the same input size.
            labels: a title per column (default: each model's variant).
            leaf_modules: as for ``inspect``.
            patch: rows and columns of each pattern.
            force: replace an existing file.

        Returns:
            The path written.
        """
        reports = [(self, model)] + [(inspect(m, self.input_size, leaf_modules=leaf_modules), m) for m in compare]
        columns = [site_reads(m, r, leaf_modules=leaf_modules, patch=patch) for r, m in reports]
        return plot_sites(columns, path, labels or [r.variant for r, _ in reports], force=force)


def read_fraction(size: int, kernel: int, stride: int, padding: int, dilation: int) -> float:
    """Fraction of the ``size`` input positions along one axis that a conv reads at least once."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    idx = (np.arange(out)[:, None] * stride - padding + np.arange(kernel)[None, :] * dilation).ravel()
    return len(np.unique(idx[(idx >= 0) & (idx < size)])) / size


def _shape(node) -> list[int]:
    meta = node.meta.get("tensor_meta")
    return list(meta.shape[1:]) if meta is not None and hasattr(meta, "shape") else []


def module_macs(model: nn.Module, input_size=(3, 224, 224)) -> tuple[int, dict[str, int]]:
    """Multiply-accumulates for one image, in total and per module name, by torch's own flop counter
    (convolutions and matrix products, functional ones included); run in eval mode without gradients,
    so measuring never changes the model (BatchNorm statistics, train/eval flags)."""
    check_model(model)
    input_size = image_size(input_size)
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), model_runs_at(input_size), counter:
        model(torch.zeros(1, *input_size, device=model_device(model)))
    # Keys are "<root class>.<module name>"; a module called twice holds the sum of its calls.
    per_module = {key.partition(".")[2]: sum(ops.values()) // 2 for key, ops in counter.get_flop_counts().items()
                  if "." in key}
    return counter.get_total_flops() // 2, per_module


@checked_arguments
def count_macs(model: nn.Module, input_size=(3, 224, 224)) -> int:
    """Multiply-accumulates for one image (torchvision's "GFLOPS"); ``model`` is not changed.

    Args:
        model: the model to measure (run once, in eval mode without gradients).
        input_size: an int N or (C, H, W): the size of the image (default 3 x 224 x 224).

    Returns:
        int: the multiply-accumulates of one forward pass.

    Raises:
        SurgeryError: the model does not run at ``input_size``.
        TypeError: ``model`` is not a torch module, or ``input_size`` not an int or (C, H, W).
    """
    return module_macs(model, input_size)[0]


@checked_arguments
def inspect(model: nn.Module, input_size=(3, 224, 224), *, leaf_modules=()) -> Report:
    """Find the residual blocks of ``model`` and report variant, MACs, positions read and dead compute.

    Args:
        model: a ResNet-like model (not changed; a model fx traces only in parts is analysed in its trunk).
        input_size: an int N or (C, H, W): the image size the shapes and MACs are for (default 3 x 224 x 224).
        leaf_modules: module classes or names fx should not trace into (default: none).

    Returns:
        Report: the variant, MACs, blocks, strided convolutions, dead computation and notes.

    Raises:
        SurgeryError: no residual blocks found (TraceError: the model cannot be traced; see `find_trunk`), or
            the model does not run at ``input_size``.
        TypeError: ``model`` is not a torch module, or ``input_size`` not an int or (C, H, W).
    """
    input_size = image_size(input_size)
    trunk = find_trunk(check_model(model), leaf_modules)
    gm, blocks, body, path = trunk.gm, trunk.blocks, trunk.module, trunk.path
    modules = dict(gm.named_modules())
    with eval_mode(body), torch.no_grad(), model_runs_at(input_size):
        ShapeProp(gm).propagate(torch.zeros(1, *input_size, device=model_device(body)))
    total, macs = module_macs(body, input_size)
    infos = []
    for b in blocks:
        names = {n.target for n in b.main + b.shortcut if n.op == "call_module"}
        infos.append(BlockInfo(b.name, str(b.kind), b.stride, Layout(b.layout).stride_on if b.layout else None,
                               str(b.shortcut_type), _shape(b.input), _shape(b.add),
                               sum(macs.get(n, 0) for n in names)))
    strided = []
    for n in gm.graph.nodes:
        m = modules.get(n.target) if n.op == "call_module" else None
        if isinstance(m, nn.Conv2d) and max(m.stride) > 1:
            h, w = _shape(n.args[0])[1:3]
            reads = (read_fraction(h, m.kernel_size[0], m.stride[0], m.padding[0], m.dilation[0])
                     * read_fraction(w, m.kernel_size[1], m.stride[1], m.padding[1], m.dilation[1]))
            strided.append(StridedConv(path(n.target), m.kernel_size[0], m.stride[0], m.dilation[0], reads))
    records, notices = dead_sites(body, leaf_modules, trunk.name)
    nodes = {path(n.target): n for n in gm.graph.nodes if n.op == "call_module"}
    macs = {path(k): v for k, v in macs.items()}
    dead = []
    for r in records:
        # Each conv that the pass moves to the lower resolution had computed the other positions for nobody.
        lost = 0
        for name in r.reduced:
            _, h, w = _shape(nodes[name])
            lost += macs[name] * (1 - math.ceil(h / 2) * math.ceil(w / 2) / (h * w))
        dead.append(DeadSite(r.block, int(round(lost)), r.absorbed))
    notes = [n.removeprefix("prune_dead: ") for n in notices]
    if dilated := dilated_note(blocks):
        notes.append(dilated)
    if trunk.name:
        notes.append(f"fx cannot trace {type(model).__name__} whole: analysed its trunk {trunk.name} "
                     f"({type(body).__name__}); MACs are the trunk's")
    source = history(model).source
    return Report(source.model if source else type(model).__name__, list(input_size), str(model_variant(blocks)),
                  total, infos, strided, dead, notes, trunk.name)
