"""Find the global spatial reduction that ends a ResNet's trunk in its fx graph, whatever form it takes.

A module (``nn.AdaptiveAvgPool2d(1)``, timm's ``SelectAdaptivePool2d``), a function
(``F.adaptive_avg_pool2d(x, 1)``, ``torch.mean(x, dim=(2, 3))``, ``F.avg_pool2d(x, x.shape[-1])``) or a
method (``x.mean((2, 3))``, ``x.flatten(2).mean(-1)``): its input is the feature map before pooling.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import SurgeryError, TraceError
from ..utils import eval_mode
from .blocks import Trunk, find_trunk, trace

__all__ = ["ADAPTIVE_POOLS", "GLOBAL_POOL_FORMS", "KERNEL_POOLS", "SPATIAL_REDUCTIONS", "GlobalPool",
           "find_global_pool", "is_global_reduction"]

ADAPTIVE_POOLS = {"adaptive_avg_pool2d", "adaptive_max_pool2d"}  # functions, by name (fx records the builtins)
KERNEL_POOLS = {"avg_pool2d", "max_pool2d"}  # global when the kernel is the feature map's size
SPATIAL_REDUCTIONS = {"mean", "amax", "sum"}  # global when they reduce dims (2, 3)
GLOBAL_POOL_FORMS = ("nn.AdaptiveAvgPool2d(1) / nn.AdaptiveMaxPool2d(1), F.adaptive_avg_pool2d(x, 1), "
                     "x.mean((2, 3)) / torch.mean / amax / sum over the spatial dims (or x.flatten(2).mean(-1)), "
                     "avg/max pooling with the feature map's size as kernel, timm's SelectAdaptivePool2d")


@dataclasses.dataclass(frozen=True)
class GlobalPool:
    """Where a model pools globally: the reduction's node, the node whose output it reduces, and what follows.

    Args:
        trunk: the traced part of the model that holds it ("" for the whole model).
        node: the reduction's fx node name.
        feature: the fx node name of its input, the feature map before pooling.
        form: the reduction as written ("relu_15.mean((2, 3))").
        after: full names of the modules with parameters after it (the classifier).
    """

    trunk: str
    node: str
    feature: str
    form: str
    after: tuple[str, ...]

    def __str__(self) -> str:
        where = f" in trunk {self.trunk}" if self.trunk else ""
        return f"input of {self.form} at node {self.node}{where}"


def _form(node: fx.Node, modules: dict) -> str:
    """The call as written, fx node names standing for tensors."""
    args = [str(a) for a in node.args] + [f"{k}={v}" for k, v in node.kwargs.items()]
    if node.op == "call_method":
        return f"{args[0]}.{node.target}({', '.join(args[1:])})"
    if node.op == "call_module":
        return f"{node.target}({', '.join(args)}) [{type(modules[node.target]).__name__}]"
    return f"{getattr(node.target, '__name__', node.target)}({', '.join(args)})"


def _arg(node: fx.Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _dims(value, rank: int) -> set[int] | None:
    if isinstance(value, int):
        return {value % rank}
    if isinstance(value, (tuple, list)) and value and all(isinstance(d, int) for d in value):
        return {d % rank for d in value}
    return None


def _spatial(node: fx.Node) -> tuple | None:
    """The spatial size of a 4-D tensor node after shape propagation, else None."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape[2:]) if shape is not None and len(shape) == 4 else None


def _from_shape(value, source: fx.Node) -> bool:
    """Whether a kernel argument is computed from ``source``'s shape (``x.shape[-1]``, ``x.size()[2:]``)."""
    todo = [a for a in (value if isinstance(value, (tuple, list)) else [value]) if isinstance(a, fx.Node)]
    seen = set()
    while todo:
        n = todo.pop()
        if n is source:
            return True
        if n not in seen and n.op != "placeholder":
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return False


def _pooled_to_one(node: fx.Node, source: fx.Node) -> bool:
    """A fixed-kernel pool is global where shape propagation saw it reduce a map larger than 1x1 to 1x1."""
    before, after = _spatial(source), _spatial(node)
    return before is not None and after == (1, 1) and before != (1, 1)


def is_global_reduction(node: fx.Node, modules: dict) -> fx.Node | None:
    """The feature map that ``node`` reduces over its spatial axes, or None when it does not.

    Args:
        node: an fx node.
        modules: the graph module's named modules.

    Returns:
        Node or None: the node whose output is pooled.
    """
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    x = node.args[0]
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            return x if m.output_size in (1, (1, 1), [1, 1]) else None
        if type(m).__name__ == "SelectAdaptivePool2d":  # timm's, when kept as a leaf
            return x if not m.is_identity() else None
        if isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)):
            return x if _pooled_to_one(node, x) else None
        return None
    if node.op not in ("call_function", "call_method"):
        return None
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name in ADAPTIVE_POOLS:
        return x if _arg(node, 1, "output_size") in (1, (1, 1), [1, 1]) else None
    if name in KERNEL_POOLS:
        kernel = _arg(node, 1, "kernel_size")
        return x if _from_shape(kernel, x) or _pooled_to_one(node, x) else None
    if name in SPATIAL_REDUCTIONS:
        return _reduced_map(x, _arg(node, 1, "dim"))
    return None


def _reduced_map(x: fx.Node, dim) -> fx.Node | None:
    """The map a mean/amax/sum over ``dim`` pools globally: x itself for dims (2, 3), or the input of a
    ``flatten(2)`` that is reduced over its last dim."""
    if _dims(dim, 4) == {2, 3}:
        return x
    flat = x.op in ("call_method", "call_function") and getattr(x.target, "__name__", x.target) == "flatten"
    if flat and _arg(x, 1, "start_dim") == 2 and _dims(dim, 3) == {2} and isinstance(x.args[0], fx.Node):
        return x.args[0]
    return None


def _trunk_input(model: nn.Module, trunk: Trunk, example: torch.Tensor) -> torch.Tensor:
    """What the trunk receives when ``model`` runs on ``example`` (the example itself for a whole model)."""
    if not trunk.name:
        return example
    seen = []
    handle = trunk.module.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        with eval_mode(model), torch.no_grad():
            model(example)
    finally:
        handle.remove()
    return seen[0]


def find_global_pool(model: nn.Module, example: torch.Tensor | None = None, leaf_modules=()) -> GlobalPool:
    """The last global reduction over the spatial axes in ``model``'s fx graph (or in its trunk's).

    Args:
        model: a model that pools its last feature map globally and classifies it.
        example: an input batch; needed only to recognise pooling with a fixed kernel the size of the map.
        leaf_modules: modules fx should not trace into (see `find_trunk`).

    Returns:
        GlobalPool: the reduction and the node of the feature map it pools.
    """
    try:
        trunk = Trunk("", model, trace(model, leaf_modules), [])
    except TraceError:
        trunk = find_trunk(model, leaf_modules)  # the traceable submodule that holds the blocks
    gm = trunk.gm
    if example is not None:
        with eval_mode(model), torch.no_grad():  # eval mode: measuring never moves BatchNorm statistics
            ShapeProp(gm).propagate(_trunk_input(model, trunk, example))
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    found = [(i, f) for i, n in enumerate(nodes) if (f := is_global_reduction(n, modules)) is not None]
    if not found:
        raise SurgeryError(f"no global pooling over the spatial axes found in {type(model).__name__} (looked for "
                           f"{GLOBAL_POOL_FORMS}); objective='features' needs one: use objective='logits'")
    last, feature = found[-1]
    after = tuple(trunk.path(n.target) for n in nodes[last + 1:]
                  if n.op == "call_module" and any(True for _ in modules[n.target].parameters()))
    return GlobalPool(trunk.name, nodes[last].name, feature.name, _form(nodes[last], modules), after)
