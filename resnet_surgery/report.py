"""`inspect`: what a model's residual blocks look like, what they cost, and what they never read."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .blocks import eval_mode, find_blocks, model_variant, trace
from .prune import dead_sites


@dataclass
class BlockInfo:
    name: str
    kind: str  # bottleneck | basic | other
    stride: int
    stride_on: str | None  # 1x1 (v1) | 3x3 (v1.5) | 3x3-dilated (exact v1) | n/a | other | None
    shortcut: str
    in_shape: list[int]
    out_shape: list[int]
    macs: int


@dataclass
class StridedConv:
    name: str
    kernel: int
    stride: int
    dilation: int
    reads: float  # fraction of input positions the conv ever reads


@dataclass
class DeadSite:
    block: str  # the downsampling block whose input is read only at stride 2
    dead_macs: int  # MACs spent upstream on positions nobody reads
    absorbed: list[str]


@dataclass
class Report:
    model: str
    input_size: list[int]
    variant: str
    macs: int
    blocks: list[BlockInfo]
    strided_convs: list[StridedConv]
    dead: list[DeadSite] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

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
        lines = [f"{self.model}: variant {self.variant}, {self.macs / 1e9:.3f} GMACs at {size}, "
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


def table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def read_fraction(size: int, kernel: int, stride: int, padding: int, dilation: int) -> float:
    """Fraction of the ``size`` input positions along one axis that a conv reads at least once."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    idx = (np.arange(out)[:, None] * stride - padding + np.arange(kernel)[None, :] * dilation).ravel()
    return len(np.unique(idx[(idx >= 0) & (idx < size)])) / size


def _shape(node) -> list[int]:
    meta = node.meta.get("tensor_meta")
    return list(meta.shape[1:]) if meta is not None and hasattr(meta, "shape") else []


def _macs(m: nn.Module, out_shape: list[int]) -> int:
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        return math.prod(out_shape) * (m.in_channels // m.groups) * kh * kw
    if isinstance(m, nn.Linear):
        return math.prod(out_shape) * m.in_features
    return 0


def conv_macs(gm) -> dict[str, int]:
    """MACs per conv/linear module call of a shape-propagated graph (batch 1)."""
    modules = dict(gm.named_modules())
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out[n.target] = out.get(n.target, 0) + _macs(modules[n.target], _shape(n))
    return out


def count_macs(model: nn.Module, input_size=(3, 224, 224), leaf_modules=()) -> int:
    """Multiply-accumulates of convolutions and linear layers for one image (torchvision's "GFLOPS")."""
    gm = trace(model, leaf_modules)
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(1, *input_size))
    return sum(conv_macs(gm).values())


def inspect(model: nn.Module, input_size=(3, 224, 224), *, leaf_modules=()) -> Report:
    """Find the residual blocks of ``model`` and report variant, MACs, positions read and dead compute."""
    gm = trace(model, leaf_modules)
    blocks = find_blocks(gm)
    modules = dict(gm.named_modules())
    with eval_mode(model), torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(1, *input_size))
    macs = conv_macs(gm)
    stride_on = {"v1": "1x1", "v1.5": "3x3", "v1.5-dilated": "3x3-dilated"}
    infos = []
    for b in blocks:
        names = {n.target for n in b.main + b.shortcut if n.op == "call_module"}
        infos.append(BlockInfo(b.name, b.kind, b.stride, stride_on.get(b.layout, b.layout), b.shortcut_type,
                               _shape(b.input), _shape(b.add), sum(macs.get(n, 0) for n in names)))
    strided = []
    for n in gm.graph.nodes:
        m = modules.get(n.target) if n.op == "call_module" else None
        if isinstance(m, nn.Conv2d) and max(m.stride) > 1:
            h, w = _shape(n.args[0])[1:3]
            reads = (read_fraction(h, m.kernel_size[0], m.stride[0], m.padding[0], m.dilation[0])
                     * read_fraction(w, m.kernel_size[1], m.stride[1], m.padding[1], m.dilation[1]))
            strided.append(StridedConv(n.target, m.kernel_size[0], m.stride[0], m.dilation[0], reads))
    records, notices = dead_sites(model, leaf_modules)
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    dead = []
    for r in records:
        # Each conv that the pass moves to the lower resolution had computed the other positions for nobody.
        lost = 0
        for name in r["reduced"]:
            _, h, w = _shape(nodes[name])
            lost += macs[name] * (1 - math.ceil(h / 2) * math.ceil(w / 2) / (h * w))
        dead.append(DeadSite(r["block"], int(round(lost)), r["absorbed"]))
    notes = [n.removeprefix("prune_dead: ") for n in notices]
    name = getattr(model, "resnet_surgery_source", {}).get("model", type(model).__name__)
    return Report(name, list(input_size), model_variant(blocks), sum(macs.values()),
                  infos, strided, dead, notes)
