"""Find residual blocks in a model's torch.fx graph, from the dataflow alone (no class or attribute names).

A residual block is an addition whose two operands meet again upstream at one node, the block input:
the operand whose path holds two or more convolutions is the main branch, the other is the shortcut
(identity when it *is* the block input, else a projection: optional pool, conv, norm).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from ..arguments import checked_arguments
from ..errors import SurgeryError, TraceError, first_line
from ..utils import check_argument, check_model
from ..vocab import PROJECTIONS, BlockKind, Layout, Shortcut, Variant
from .layers import Subsample

__all__ = [
    "ADD_FUNCTIONS", "ADD_METHODS", "Block", "NORM_TYPES", "SurgeryTracer", "Trunk", "dilated_note",
    "find_blocks", "find_trunk", "full_name", "is_add", "model_variant", "modules_on", "pool_module", "trace",
]

ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_"}
# FrozenBatchNorm2d (torchvision's detection trunks) is no _NormBase but normalises like one.
NORM_TYPES = (nn.modules.batchnorm._NormBase, FrozenBatchNorm2d, nn.GroupNorm, nn.LayerNorm)


class SurgeryTracer(fx.Tracer):
    """An fx tracer that remembers which module it was inside when tracing failed."""

    def __init__(self, leaf_modules=()):
        super().__init__()
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.failed_in: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (Subsample, FrozenBatchNorm2d, *self.leaf_types)) or qualname in self.leaf_names:
            return True  # a FrozenBatchNorm2d stays one module (a norm), not its reshapes and buffers
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # The innermost module sees the exception first: that is the one to name.
            if self.failed_in is None:
                self.failed_in = (self.path_of_module(m), type(m).__name__)
            raise


@checked_arguments
def trace(model: nn.Module, leaf_modules=()) -> fx.GraphModule:
    """Symbolically trace ``model``; a failure names the module and how to mark it as a leaf.

    Args:
        model: the model to trace (a GraphModule is copied as a plain GraphModule, not traced again).
        leaf_modules: module classes or names fx should not trace into (their insides are not analysed;
            default: none).

    Returns:
        GraphModule: the traced model, sharing ``model``'s modules.

    Raises:
        TraceError: fx cannot trace ``model``; the message names the module where it failed.
    """
    if isinstance(model, fx.GraphModule):
        # A plain GraphModule over the same modules: subclasses such as torchvision's DualGraphModule swap
        # their graph back on .train()/.eval(), which would undo a rewrite of the graph.
        return fx.GraphModule(model, model.graph, type(model).__name__)
    tracer = SurgeryTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as e:
        name, cls = tracer.failed_in or ("", type(model).__name__)
        where = f"module '{name}' ({cls})" if name else f"the forward of {cls}"
        reason = first_line(e, 500)
        raise TraceError(
            f"torch.fx cannot trace {where}: {reason}. Mark it as a leaf with leaf_modules=[{cls}] "
            f"(its insides are then not analysed), or make its forward free of data-dependent control flow"
        ) from None
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


@dataclass
class Block:
    """One residual block: the nodes and modules of its two branches, in forward order."""

    name: str  # common module-name prefix, e.g. "layer2.0"
    input: fx.Node  # where the branches split
    add: fx.Node  # where they join
    main: list[fx.Node]
    shortcut: list[fx.Node]
    main_convs: list[str]
    shortcut_convs: list[str]
    shortcut_pools: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    kind: BlockKind = BlockKind.OTHER
    stride: int = 1
    layout: Layout | None = None  # downsampling blocks, and stage-first blocks of a dilated stage
    shortcut_type: Shortcut = Shortcut.IDENTITY

    @property
    def downsamples(self) -> bool:
        return self.stride > 1


def is_add(node: fx.Node) -> bool:
    """Whether ``node`` adds two tensors (``+``, ``+=``, ``torch.add``, ``.add``/``.add_``): a residual sum."""
    if node.op == "call_function" and node.target in ADD_FUNCTIONS:
        return True
    return node.op == "call_method" and node.target in ADD_METHODS


def pool_module(node: fx.Node) -> nn.Module | None:
    """The nn.AvgPool2d / nn.MaxPool2d that a functional pooling call (``F.avg_pool2d(x, 2)``, ``F.max_pool2d(x, 3,
    2, 1)``) computes, when its arguments are constants; else None.

    Args:
        node: an fx node.

    Returns:
        Module or None: a new pooling module with the call's kernel, stride, padding and rounding.
    """
    name = getattr(node.target, "__name__", None) if node.op == "call_function" else None
    kinds = {"avg_pool2d": (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")),
             "max_pool2d": (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode"))}
    if name not in kinds:
        return None
    kind, fields = kinds[name]
    values = dict(zip(fields, node.args[1:]))
    values.update({k: v for k, v in node.kwargs.items() if k in fields})
    if any(isinstance(v, fx.Node) or (isinstance(v, (tuple, list)) and any(isinstance(i, fx.Node) for i in v))
           for v in values.values()) or "kernel_size" not in values:
        return None  # a kernel from the input's shape: a global pool, no fixed stride
    values["stride"] = values.get("stride") or None  # F.*_pool2d take stride [] or None for the kernel's
    return kind(**values)


def _node_module(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The module ``node`` calls, or the pooling module that its functional pooling call computes."""
    return modules[node.target] if node.op == "call_module" else pool_module(node)


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.args if isinstance(a, fx.Node)]


def _trunk(node: fx.Node) -> list[fx.Node]:
    """The path upstream from ``node`` following each node's first tensor input (the data, not a gate)."""
    path = [node]
    while True:
        inputs = _tensor_args(path[-1])
        if not inputs:
            return path
        path.append(inputs[0])


def modules_on(nodes, modules, types) -> list[str]:
    """Names of the modules of ``types`` that ``nodes`` call, in order."""
    return [n.target for n in nodes if n.op == "call_module" and isinstance(modules[n.target], types)]


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    if not parts:
        return ""
    prefix = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    return ".".join(prefix)


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _stride(m: nn.Module) -> int:
    s = getattr(m, "stride", 1)
    return _pair(s)[0] if s is not None else int(_pair(m.kernel_size)[0])


def _classify(block: Block, modules: dict[str, nn.Module]) -> None:
    convs = [modules[c] for c in block.main_convs]
    kernels = [_pair(c.kernel_size)[0] for c in convs]
    if len(convs) == 3 and kernels[0] == 1 and kernels[1] > 1 and kernels[2] == 1:
        block.kind = BlockKind.BOTTLENECK
    elif len(convs) == 2 and all(k > 1 for k in kernels):
        block.kind = BlockKind.BASIC
    stride = 1
    for n in block.main:
        if isinstance(m := _node_module(n, modules), (nn.Conv2d, nn.AvgPool2d, nn.MaxPool2d)):
            stride *= _stride(m)
    block.stride = stride
    if stride > 1:
        if block.kind == BlockKind.BOTTLENECK:
            a, b = convs[0], convs[1]
            if _stride(a) == stride and _stride(b) == 1:
                block.layout = Layout.V1
            elif _stride(a) == 1 and _stride(b) == stride and _pair(b.dilation)[0] == 1:
                block.layout = Layout.V1_5
            elif _stride(a) == 1 and _stride(b) == stride and _pair(b.dilation)[0] == 2 and _pair(b.padding)[0] == 2:
                block.layout = Layout.V1_5_DILATED
            else:
                block.layout = Layout.OTHER
        else:
            block.layout = Layout.NOT_APPLICABLE
    block.shortcut_type = _shortcut_type(block, modules)


def _shortcut_type(block: Block, modules: dict[str, nn.Module]) -> Shortcut:
    mods = [modules[n.target] for n in block.shortcut if n.op == "call_module"]
    mods = [m for m in mods if not isinstance(m, nn.Identity)]
    convs = [m for m in mods if isinstance(m, nn.Conv2d)]
    pools = [m for m in mods if isinstance(m, nn.AvgPool2d)]
    if any(pool_module(n) is not None for n in block.shortcut):
        return Shortcut.OTHER  # a functional pool: rewrites change shortcuts through their modules only
    if not block.shortcut or (not convs and not mods):
        return Shortcut.IDENTITY
    if len(mods) == 1 and isinstance(mods[0], Subsample):
        return Shortcut.SUBSAMPLE
    if len(convs) != 1:
        return Shortcut.OTHER
    k, s = _pair(convs[0].kernel_size)[0], _stride(convs[0])
    if pools and k == 1 and s == 1:
        return Shortcut.AVGPOOL
    if not pools and k == 1:
        return Shortcut.CONV1X1
    if not pools and k == 3 and s > 1 and _pair(convs[0].padding)[0] == 1:
        return Shortcut.CONV3X3
    return Shortcut.OTHER


def full_name(prefix: str | None, name: str | None) -> str:
    """``name`` inside the submodule at ``prefix`` as a full path in the whole model ("" stays "")."""
    return f"{prefix}.{name}" if prefix and name else prefix or name or ""


def dilated_note(blocks: list[Block]) -> str | None:
    """What to say of dilated stages (segmentation trunks), or None when there are none."""
    dilated = [b.name for b in blocks if b.layout == Layout.DILATED]
    if not dilated:
        return None
    return f"{', '.join(dilated)}: dilation replaces the stride (a dilated stage keeps its resolution): nothing to move"


def _kxk_dilation(block: Block, modules: dict[str, nn.Module]) -> int:
    return max((_pair(modules[c].dilation)[0] for c in block.main_convs if _pair(modules[c].kernel_size)[0] > 1),
               default=1)


def _mark_dilated(blocks: list[Block], modules: dict[str, nn.Module]) -> None:
    """A stage-first block (projection shortcut) at stride 1 whose 3x3s, or the next block's, are dilated: a
    stage where dilation replaced the stride (segmentation trunks). Its resolution is kept on purpose."""
    for b in blocks:
        if b.stride > 1 or b.shortcut_type not in PROJECTIONS:
            continue
        # only stride-1 blocks of its own stage: the next stage's exact-dilated stride block is not one of them
        following = [c for c in blocks if c.stride == 1 and b.add in _trunk(c.input)[:3]]
        if _kxk_dilation(b, modules) > 1 or any(_kxk_dilation(c, modules) > 1 for c in following):
            b.layout = Layout.DILATED


def _depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels


@checked_arguments
def find_blocks(gm: fx.GraphModule, prefix: str = "") -> list[Block]:
    """Every residual addition in ``gm`` whose main branch holds at least two convolutions and no other block;
    block names get ``prefix`` (where ``gm`` sits in a larger model).

    Args:
        gm: a traced model (see `trace`).
        prefix: the module path of ``gm`` in a larger model ("": ``gm`` is the whole model).

    Returns:
        The blocks in graph order, classified (kind, stride, layout, shortcut type).

    Raises:
        SurgeryError: ``gm`` holds no residual block.
        TypeError: ``gm`` is not a GraphModule, or ``prefix`` is not a str.
    """
    check_argument(gm, "gm", fx.GraphModule, "a torch.fx GraphModule", "; trace the model first: trace(model)")
    modules = dict(gm.named_modules())
    blocks, depthwise, adds = [], 0, set()
    for node in gm.graph.nodes:
        if not is_add(node) or len(_tensor_args(node)) != 2:
            continue
        a, b = _tensor_args(node)
        path_a, path_b = _trunk(a), _trunk(b)
        index_a = {n: i for i, n in enumerate(path_a)}
        junction = next((n for n in path_b if n in index_a), None)
        if junction is None:
            continue
        branch_a = path_a[: index_a[junction]][::-1]
        branch_b = path_b[: path_b.index(junction)][::-1]
        convs_a = modules_on(branch_a, modules, nn.Conv2d)
        convs_b = modules_on(branch_b, modules, nn.Conv2d)
        if len(convs_b) > len(convs_a):
            branch_a, branch_b, convs_a, convs_b = branch_b, branch_a, convs_b, convs_a
        if len(convs_a) < 2 or len(convs_b) > 1:
            continue
        if any(_depthwise(modules[c]) for c in convs_a):
            depthwise += 1  # an inverted residual (MobileNet): not a ResNet block
            continue
        if adds.intersection(branch_a + branch_b):
            continue  # a branch through other blocks: a feature pyramid's top-down sum, not a residual block
        names = [n.target for n in branch_a + branch_b if n.op == "call_module"]
        name = _common_prefix(names) or node.name
        block = Block(
            name=full_name(prefix, name),
            input=junction,
            add=node,
            main=branch_a,
            shortcut=branch_b,
            main_convs=convs_a,
            shortcut_convs=convs_b,
            shortcut_pools=modules_on(branch_b, modules, nn.AvgPool2d),
            norms=modules_on(branch_a + branch_b, modules, NORM_TYPES),
        )
        _classify(block, modules)
        blocks.append(block)
        adds.add(node)
    _mark_dilated(blocks, modules)
    if not blocks:
        extra = f" ({depthwise} depthwise inverted-residual blocks are not ResNet blocks)" if depthwise else ""
        raise SurgeryError(
            f"no residual blocks found in {type(gm).__name__}{extra}: resnet-surgery needs ResNet-like blocks, "
            "a convolutional branch added to an identity or projection shortcut"
        )
    return blocks


def model_variant(blocks: list[Block]) -> Variant:
    """v1, v1.5, d or mixed, from the downsampling blocks' stride placement and shortcut."""
    labels = set()
    for b in blocks:
        if not b.downsamples:
            continue
        on_3x3 = b.layout in (Layout.V1_5, Layout.V1_5_DILATED, Layout.NOT_APPLICABLE)
        if b.layout == Layout.V1 and b.shortcut_type in PROJECTIONS:
            labels.add(Variant.V1)
        elif on_3x3 and b.shortcut_type in PROJECTIONS:
            labels.add(Variant.V1_5)
        elif on_3x3 and b.shortcut_type == Shortcut.AVGPOOL:
            labels.add(Variant.D)
        else:
            labels.add(Variant.MIXED)
    if not labels:
        return Variant.V1_5  # no downsampling block: nothing distinguishes the variants
    return labels.pop() if len(labels) == 1 else Variant.MIXED


@dataclass
class Trunk:
    """The traceable part of a model that holds its residual blocks: the model itself, or a submodule of a model
    fx cannot trace whole (a detection model's ``backbone``); block names are full paths in the model."""

    name: str  # "" for the whole model
    module: nn.Module
    gm: fx.GraphModule
    blocks: list[Block]

    def path(self, name: str) -> str:
        """A name inside the trunk as a full path in the model."""
        return full_name(self.name, name)


@checked_arguments
def find_trunk(model: nn.Module, leaf_modules=()) -> Trunk:
    """``model`` when fx traces it whole, else its one outermost traceable submodule holding residual blocks.

    Args:
        model: the model to search.
        leaf_modules: module classes or names fx should not trace into (default: none).

    Returns:
        Trunk: the traced trunk and its blocks, with block names as full paths in ``model``.

    Raises:
        TraceError: ``model`` cannot be traced whole, and no submodule holds blocks, or several do (an
            untraceable module among the blocks splits the ResNet into pieces: none of them is the trunk).
        SurgeryError: ``model`` traces whole but holds no residual block.
        TypeError: ``model`` is not a torch module.
    """
    check_model(model)
    try:
        gm = trace(model, leaf_modules)
    except TraceError as e:
        parts = _traceable_parts(model, "", leaf_modules)
        if len(parts) == 1:
            return parts[0]
        if not parts:
            raise TraceError(f"{e}; no traceable submodule holds residual blocks either") from None
        names = ", ".join(p.name for p in parts[:4]) + (", ..." if len(parts) > 4 else "")
        raise TraceError(f"{e}; the residual blocks are split over several traceable submodules ({names}), "
                         "so none of them is the whole trunk") from None
    return Trunk("", model, gm, find_blocks(gm))


def _traceable_parts(module: nn.Module, prefix: str, leaf_modules) -> list[Trunk]:
    parts = []
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if not any(isinstance(m, nn.Conv2d) for m in child.modules()):
            continue
        try:
            gm = trace(child, leaf_modules)
        except TraceError:
            parts += _traceable_parts(child, path, leaf_modules)
            continue
        try:
            parts.append(Trunk(path, child, gm, find_blocks(gm, path)))
        except SurgeryError:
            pass  # traceable, but no residual blocks (a head, a transform)
    return parts
