"""Remove the computation a v1 ResNet throws away ("Kaiming's equivalence"), as a general fx pass.

Where every reader of a tensor X is a 1x1 conv with an even stride (v1's downsampling block: main 1x1
and projection 1x1, both stride 2), only X[:, :, ::2, ::2] is ever read. Subsampling commutes with 1x1
convs, norms in eval mode, element-wise activations and additions, so it is pushed upstream until a
conv with a kernel absorbs it as stride x2 (the previous block's 3x3) or a tensor that others read too
gets an explicit Subsample (the previous block's identity shortcut). The readers lose their stride.
The function is unchanged in eval mode; BatchNorm in training mode sees fewer positions.
"""

from __future__ import annotations

from collections import Counter
from functools import partial

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from ..arguments import checked_arguments
from ..utils import private_copy
from ..vocab import Layout, Op
from .blocks import find_blocks, full_name, is_add, model_variant, trace
from .layers import Subsample
from .recipe import Rewrite

__all__ = [
    "ELEMENTWISE_FUNCTIONS", "ELEMENTWISE_METHODS", "ELEMENTWISE_MODULES", "dead_sites",
    "prune_dead_compute",
]

ELEMENTWISE_MODULES = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish,
                       nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.Mish, nn.ELU, nn.Hardsigmoid,
                       nn.Hardtanh, nn.PReLU)
# The same activations written as functions and methods (F.relu(x), torch.relu_(x), x.relu_(), x.clamp(min=0)).
ELEMENTWISE_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.silu, F.gelu, torch.sigmoid, F.sigmoid,
                         F.leaky_relu, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh, F.mish, F.elu,
                         F.dropout, torch.clamp}
ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min", "clamp_min_"}


def _reads_subsampled(conv: nn.Module) -> bool:
    """A 1x1, unpadded conv with an even stride reads only the even rows and columns of its input."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.padding == (0, 0)
            and conv.stride[0] % 2 == 0 and conv.stride[1] % 2 == 0)


class _Pusher:
    """Pushes a stride-2 subsample upstream through one graph, recording what it changed."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        self.absorbed: list[str] = []  # convs whose stride doubled
        self.reduced: list[str] = []  # convs that now run at the lower resolution
        self.subsampled: list[str] = []  # nodes that got an explicit Subsample

    def _module(self, node: fx.Node):
        return self.modules.get(node.target) if node.op == "call_module" else None

    def _elementwise(self, node: fx.Node) -> bool:
        m = self._module(node)
        if m is not None:
            return isinstance(m, ELEMENTWISE_MODULES)
        if node.op == "call_function":
            return node.target in ELEMENTWISE_FUNCTIONS
        return node.op == "call_method" and node.target in ELEMENTWISE_METHODS

    def subsample_input(self, node: fx.Node, arg: fx.Node) -> None:
        """Make ``node`` read S(arg): push into ``arg`` when only ``node`` reads it, else insert a Subsample."""
        if len(arg.users) == 1 and arg.op != "placeholder":
            self.push(arg)
            return
        name = f"subsample_{arg.name}"
        self.gm.add_submodule(name, Subsample(2))
        with self.gm.graph.inserting_before(node):
            s = self.gm.graph.call_module(name, (arg,))
        node.replace_input_with(arg, s)
        self.subsampled.append(arg.name)

    def push(self, node: fx.Node) -> None:
        """Every reader of ``node`` now wants S(node): make ``node`` compute that."""
        m = self._module(node)
        if isinstance(m, nn.Conv2d) and self.calls[node.target] == 1:
            if m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0):
                self.reduced.append(node.target)
                self.subsample_input(node, node.args[0])
            else:
                # A conv's output at even positions is the same conv with twice the stride.
                m.stride = (m.stride[0] * 2, m.stride[1] * 2)
                self.absorbed.append(node.target)
                self.reduced.append(node.target)
            return
        if self._elementwise(node) and isinstance(node.args[0], fx.Node):
            self.subsample_input(node, node.args[0])
            return
        if is_add(node) and all(isinstance(a, fx.Node) for a in node.args[:2]):
            for arg in dict.fromkeys(node.args[:2]):
                self.subsample_input(node, arg)
            return
        # Anything else: subsample its output where it is read.
        name = f"subsample_{node.name}"
        self.gm.add_submodule(name, Subsample(2))
        with self.gm.graph.inserting_after(node):
            s = self.gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(s, delete_user_cb=lambda user: user is not s)
        self.subsampled.append(node.name)


@checked_arguments
def prune_dead_compute(model: nn.Module, leaf_modules=(), prefix: str = ""):
    """Return (pruned GraphModule, Rewrite records, notices); ``model`` must be a private copy (it is modified).

    A site whose input is also read elsewhere (a feature pyramid's tap, a returned feature map) is left alone,
    and a notice names those readers.

    Args:
        model: a private copy of the model (its convolutions' strides are changed in place).
        leaf_modules: module classes or names fx should not trace into (default: none).
        prefix: where ``model`` sits in a larger model (a detection model's trunk); records and notices name
            modules by their full path ("": ``model`` is the whole model).

    Returns:
        (the pruned GraphModule, a Rewrite per pruned site, notices as strings).

    Raises:
        SurgeryError: ``model`` holds no residual block (TraceError: it cannot be traced).
        TypeError: ``prefix`` is not a str.
    """
    gm = trace(model, leaf_modules)
    blocks = find_blocks(gm, prefix)
    path = partial(full_name, prefix)
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    records, notices = [], []
    candidates = [b for b in blocks if b.downsamples and b.layout == Layout.V1]
    if not candidates:
        notices.append(f"prune_dead: the model is {model_variant(blocks)}: its downsampling blocks read every "
                       "position of their input, so no computation is dead")
    for block in candidates:
        x = block.input
        readers = list(x.users)
        refuse = [u for u in readers if not (u.op == "call_module" and _reads_subsampled(modules[u.target])
                                             and calls[u.target] == 1)]
        if x.op == "placeholder":
            refuse = readers  # the model input itself: nothing upstream to save
        if refuse:
            names = ", ".join(path(u.target) if u.op == "call_module" else
                              "the output" if u.op == "output" else u.name for u in refuse)
            notices.append(f"prune_dead: {block.name}: its input '{x.name}' is also read at full resolution by "
                           f"{names}: not pruned there")
            continue
        for u in readers:
            conv = modules[u.target]
            conv.stride = (conv.stride[0] // 2, conv.stride[1] // 2)
        pusher = _Pusher(gm)
        pusher.push(x)
        records.append(Rewrite(block.name, Op.PRUNE_DEAD, True, input=x.name, readers=[path(u.target) for u in readers],
                               absorbed=[path(n) for n in pusher.absorbed], reduced=[path(n) for n in pusher.reduced],
                               subsampled=pusher.subsampled))
    gm.graph.lint()
    gm.recompile()
    return gm, records, notices


def dead_sites(model: nn.Module, leaf_modules=(), prefix: str = ""):
    """The prune_dead records and notices for ``model``, computed on a copy (``model`` is untouched)."""
    _, records, notices = prune_dead_compute(private_copy(model), leaf_modules, prefix)
    return records, notices

