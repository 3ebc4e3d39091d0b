"""Rewrites of downsampling blocks: move the stride between the 1x1 and the 3x3, swap projection shortcuts.

Every rewrite changes module attributes or swaps one module on a deep copy, so the converted model keeps
its class (a torchvision ResNet stays a torchvision ResNet) and the state_dict keys of untouched
parameters. Touched keys: the avgpool shortcut wraps the 1x1 conv at ``P`` as ``P.0`` (AvgPool2d) and
``P.1`` (the conv, stride 1), so ``P.weight`` becomes ``P.1.weight``; going back unwraps it. The conv3x3
shortcut keeps the key ``P.weight`` with shape [C, Cin, 3, 3] (the 1x1 weights in the centre tap).
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from ..arguments import checked_arguments
from ..errors import NotExactError, SurgeryError, first_line
from ..history import history, record
from ..utils import check_model, eval_mode, image_size, model_device, private_copy
from ..vocab import PROJECTIONS, TARGET_SHORTCUTS, TARGET_VARIANTS, Layout, Op, Shortcut, Variant
from .blocks import Block, Trunk, dilated_note, find_blocks, find_trunk, model_variant, trace
from .layers import avgpool_shortcut, conv1x1_from, conv3x3_from, off_centre_is_zero
from .probe import output_tensors
from .prune import prune_dead_compute
from .recipe import Options, Rewrite, new_recipe

__all__ = ["HANDLERS", "Step", "SurgeryNotice", "apply_step", "convert", "plan"]


class SurgeryNotice(UserWarning):
    """Something the user should know about a conversion (a no-op, a skipped block, a changed function)."""


@dataclass
class Step:
    """One planned rewrite of one block."""

    block: Block
    op: Op
    exact: bool
    why_not_exact: str = ""


def _set_stride(conv: nn.Conv2d, stride: int, dilation: int = 1) -> None:
    k = conv.kernel_size[0]
    conv.stride = (stride, stride)
    conv.dilation = (dilation, dilation)
    conv.padding = (dilation * (k - 1) // 2,) * 2


# --- planning --------------------------------------------------------------------------------------


def _target_layout(layout: Layout, to: Variant, exact: bool) -> Layout:
    if to == Variant.V1:
        return Layout.V1
    if exact and layout == Layout.V1:
        return Layout.V1_5_DILATED  # the only exact way to put the stride on the 3x3
    if exact:
        return layout
    return Layout.V1_5


def _stride_step(block: Block, target: Layout) -> Step | None:
    current = block.layout
    if current == target:
        return None
    if target == Layout.V1:
        exact = current == Layout.V1_5_DILATED
        why = "" if exact else (f"{block.name}: with the stride on the 1x1, the 3x3 sees 1 of every 4 positions it "
                                "read before; no exact rewrite exists")
        return Step(block, Op.STRIDE_TO_1X1, exact, why)
    if target == Layout.V1_5_DILATED:
        return Step(block, Op.STRIDE_TO_3X3_DILATED, True)
    why = (f"{block.name}: with the stride on the 3x3, the 3x3 reads positions the strided 1x1 never computed; "
           "use --exact (exact=True) for the dilated form, which is exact")
    if current == Layout.V1_5_DILATED:
        why = f"{block.name}: dropping the dilation changes which positions the 3x3 reads"
    return Step(block, Op.STRIDE_TO_3X3, False, why)


def _shortcut_step(block: Block, target: Shortcut, modules: dict[str, nn.Module]) -> Step | None:
    current = block.shortcut_type
    if current == target:
        return None
    if target == Shortcut.CONV3X3 and current == Shortcut.CONV1X1:
        return Step(block, Op.SHORTCUT_CONV3X3, True)
    if target == Shortcut.CONV1X1 and current == Shortcut.CONV3X3:
        exact = off_centre_is_zero(modules[block.shortcut_convs[0]])
        return Step(block, Op.SHORTCUT_CONV1X1, exact, "" if exact else
                    f"{block.name}: the 3x3 shortcut has non-zero off-centre taps that a 1x1 cannot hold")
    if target == Shortcut.AVGPOOL:
        why = (f"{block.name}: the avgpool shortcut averages {block.stride**2} positions where the strided conv "
               "read one; no exact rewrite exists")
    else:
        why = f"{block.name}: the strided {target} shortcut reads one of the {block.stride**2} positions the avgpool averaged"
    return Step(block, Op.shortcut_to(target), False, why)


def plan(blocks: list[Block], modules, to: Variant | None, shortcut: Shortcut | None, exact: bool):
    """The rewrites that take ``blocks`` to the requested variant, and notices for what does not apply."""
    steps, notices = [], []
    downsampling = [b for b in blocks if b.downsamples]
    if to is not None:
        basic = [b.name for b in downsampling if b.layout == Layout.NOT_APPLICABLE]
        if basic and to in (Variant.V1, Variant.V1_5):
            notices.append(f"stride moves do not apply to {len(basic)} blocks without a 1x1 on the main path "
                           f"(BasicBlock: {', '.join(basic)}): left as they are")
        for b in downsampling:
            if b.layout == Layout.OTHER:
                notices.append(f"{b.name}: stride placement not recognised (main convs {b.main_convs}): left as it is")
            elif b.layout not in (Layout.NOT_APPLICABLE, None):
                step = _stride_step(b, _target_layout(b.layout, to, exact))
                if step:
                    steps.append(step)
    target_shortcut = shortcut
    for b in downsampling:
        if b.shortcut_type not in (*PROJECTIONS, Shortcut.AVGPOOL):
            if shortcut or to == Variant.D:
                notices.append(f"{b.name}: shortcut is {b.shortcut_type}, not a projection: left as it is")
            continue
        if shortcut is None and to == Variant.D:
            target_shortcut = Shortcut.AVGPOOL
        elif shortcut is None and to in (Variant.V1, Variant.V1_5) and b.shortcut_type == Shortcut.AVGPOOL:
            target_shortcut = Shortcut.CONV1X1
        elif shortcut is None:
            continue
        step = _shortcut_step(b, target_shortcut, modules)
        if step:
            steps.append(step)
    return steps, notices


# --- applying ----------------------------------------------------------------------------------------


def _move_stride(model: nn.Module, b: Block, rewrite: Rewrite, first: tuple[int, int], second: tuple[int, int]):
    """Set (stride, dilation) of the block's first two main-path convs: the 1x1 and the 3x3."""
    _set_stride(model.get_submodule(b.main_convs[0]), *first)
    _set_stride(model.get_submodule(b.main_convs[1]), *second)
    rewrite.convs = {b.main_convs[1]: b.main_convs[1]}


def _stride_to_1x1(model: nn.Module, b: Block, rewrite: Rewrite) -> None:
    _move_stride(model, b, rewrite, (b.stride, 1), (1, 1))


def _stride_to_3x3(model: nn.Module, b: Block, rewrite: Rewrite) -> None:
    _move_stride(model, b, rewrite, (1, 1), (b.stride, 1))


def _stride_to_3x3_dilated(model: nn.Module, b: Block, rewrite: Rewrite) -> None:
    # 1x1 stride s then 3x3 stride 1 == 1x1 stride 1 then 3x3 stride s, dilation s, padding s
    _move_stride(model, b, rewrite, (1, 1), (b.stride, b.stride))


def _unpool(model: nn.Module, b: Block, rewrite: Rewrite) -> tuple[str, nn.Conv2d]:
    """Undo an avgpool shortcut: unwrap our own Sequential(pool, conv), or blank a separate pool module.
    Returns the shortcut conv's name and module, now with the block's stride."""
    name = b.shortcut_convs[0]
    conv = model.get_submodule(name)
    if b.shortcut_type == Shortcut.AVGPOOL:
        pool = b.shortcut_pools[0]
        parent = pool.rpartition(".")[0]
        wrapper = model.get_submodule(parent) if parent else None
        if isinstance(wrapper, nn.Sequential) and len(wrapper) == 2 and f"{parent}.1" == name:
            model.set_submodule(parent, conv)
            rewrite.keys = {f"{name}.weight": f"{parent}.weight"}
            name = parent
        else:
            model.set_submodule(pool, nn.Identity())
        _set_stride(conv, b.stride)
    return name, conv


def _shortcut_avgpool(model: nn.Module, b: Block, rewrite: Rewrite) -> None:
    name, conv = _unpool(model, b, rewrite)
    if conv.kernel_size != (1, 1):
        conv = conv1x1_from(conv, 1)
        model.set_submodule(name, conv)
    _set_stride(conv, 1)
    # A layout with a pool slot of its own (timm's avg_down, blanked to Identity) gets its pool back.
    slots = [n.target for n in b.shortcut if n.op == "call_module" and isinstance(model.get_submodule(n.target), nn.Identity)]
    if slots:
        model.set_submodule(slots[0], avgpool_shortcut(b.stride))
        rewrite.convs = {name: b.shortcut_convs[0]}
        return
    model.set_submodule(name, nn.Sequential(avgpool_shortcut(b.stride), conv))
    rewrite.keys = {f"{b.shortcut_convs[0]}.weight": f"{name}.1.weight"}
    rewrite.convs = {f"{name}.1": b.shortcut_convs[0]}


def _shortcut_conv(build):
    """A shortcut rewrite to a strided conv made by ``build(conv, stride)`` (1x1, or 3x3 with the 1x1 centred)."""
    def rewrite_shortcut(model: nn.Module, b: Block, rewrite: Rewrite) -> None:
        name, conv = _unpool(model, b, rewrite)
        model.set_submodule(name, build(conv, b.stride))
        rewrite.convs = {name: b.shortcut_convs[0]}
    return rewrite_shortcut


# One handler per rewrite: each changes ``model`` in place and fills in the Rewrite's convs and keys.
HANDLERS = {
    Op.STRIDE_TO_1X1: _stride_to_1x1,
    Op.STRIDE_TO_3X3: _stride_to_3x3,
    Op.STRIDE_TO_3X3_DILATED: _stride_to_3x3_dilated,
    Op.SHORTCUT_AVGPOOL: _shortcut_avgpool,
    Op.SHORTCUT_CONV1X1: _shortcut_conv(conv1x1_from),
    Op.SHORTCUT_CONV3X3: _shortcut_conv(conv3x3_from),
}


def apply_step(model: nn.Module, step: Step) -> Rewrite:
    """Carry out one rewrite on ``model`` (in place).

    Args:
        model: the module holding the block (the traced trunk).
        step: the planned rewrite.

    Returns:
        Its record for the recipe (touched convs, renamed state_dict keys).
    """
    rewrite = Rewrite(step.block.name, step.op, step.exact, norms=list(step.block.norms))
    HANDLERS[step.op](model, step.block, rewrite)
    return rewrite


def _check_unshared(gm, steps: list[Step]) -> None:
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    for s in steps:
        for conv in s.block.main_convs[:2] + s.block.shortcut_convs:
            if calls[conv] > 1:
                raise SurgeryError(f"{conv} is called {calls[conv]} times in the forward; resnet-surgery can only "
                                   "rewrite convolutions that are used once")


@checked_arguments
def convert(model: nn.Module, to: str | None = None, *, shortcut: str | None = None, exact: bool = False,
            prune_dead: bool = False, input_size=(3, 224, 224), leaf_modules=(), warn: bool = True) -> nn.Module:
    """A new model converted to another downsampling variant; ``model`` is untouched.

    Args:
        model: a ResNet-like model; one that fx traces only in parts (detection) is converted in its trunk.
        to: the target variant, "v1", "v1.5" or "d".
        shortcut: the target projection shortcut, "conv1x1", "avgpool" or "conv3x3".
        exact: allow only function-preserving rewrites (v1 to v1.5 becomes the dilated form).
        prune_dead: then remove the computation a v1 model never reads (exact).
        input_size: an int N or (C, H, W), recorded: the result must run at it with the original's shapes.
        leaf_modules: module classes or names fx should not trace into.
        warn: also show each notice as a SurgeryNotice warning (they are always in the recipe's notices).

    Returns:
        The new model (same class); ``history(result).recipe`` records every rewrite and its exactness.

    Raises:
        SurgeryError: bad options, a model it cannot trace (TraceError) or convert (exactly: NotExactError).
        TypeError: ``model`` is not a torch module, or another argument of the wrong type.
    """
    check_model(model)
    if to is not None and to not in TARGET_VARIANTS:
        raise SurgeryError(f"unknown variant {to!r}: choose one of {', '.join(TARGET_VARIANTS)}")
    if shortcut is not None and shortcut not in TARGET_SHORTCUTS:
        raise SurgeryError(f"unknown shortcut {shortcut!r}: choose one of {', '.join(TARGET_SHORTCUTS)}")
    if to is None and shortcut is None and not prune_dead:
        raise SurgeryError("nothing to do: give a target variant (--to, to=), a shortcut (--shortcut, shortcut=) or "
                           "--prune-dead (prune_dead=True)")
    input_size = image_size(input_size)
    options = Options(Variant(to) if to else None, Shortcut(shortcut) if shortcut else None, exact, prune_dead,
                      list(input_size))

    new = private_copy(model)
    trunk = find_trunk(new, leaf_modules)
    body, gm, blocks = trunk.module, trunk.gm, trunk.blocks
    modules = dict(body.named_modules())
    before = model_variant(blocks)
    steps, notices = plan(blocks, modules, options.to, options.shortcut, exact)
    if exact:
        inexact = [s.why_not_exact for s in steps if not s.exact]
        if inexact:
            raise NotExactError(f"no function-preserving rewrite for this request: {inexact[0]}"
                                + (f" (and {len(inexact) - 1} more blocks)" if len(inexact) > 1 else ""))
    _check_unshared(gm, steps)
    rewrites = [_under(trunk, apply_step(body, s)) for s in steps]
    if not steps and (to or shortcut):
        notices.append(f"model is already {to or shortcut}" + (" in exact form" if exact else "") + ": nothing to change")
    dilated = dilated_note(blocks)
    if dilated and (to or shortcut):
        notices.append(dilated)
    approximate = [r.block for r in rewrites if not r.exact]
    if approximate:
        notices.append(f"this conversion changes the function: {len(approximate)} rewrites are approximate "
                       f"({', '.join(sorted(set(approximate)))}); recover accuracy with `resnet-surgery recover` "
                       "(Python: resnet_surgery.recover())")
    after = model_variant(find_blocks(trace(body, leaf_modules))) if steps else before
    if prune_dead:
        pruned, prune_rewrites, prune_notices = prune_dead_compute(body, leaf_modules, trunk.name)
        new = _replace_trunk(new, trunk, pruned)
        rewrites += prune_rewrites
        notices += prune_notices
    _check_runs(model, new, trunk.name, input_size)
    if warn:
        for note in notices:
            warnings.warn(note, SurgeryNotice, stacklevel=3)
    recipe = new_recipe(model, options, before, after, rewrites, notices)
    if trunk.name:
        recipe.trunk = trunk.name
    return record(new, source=history(model).source, recipe=recipe, calibration=None, finetune=None)


def _check_runs(model: nn.Module, new: nn.Module, trunk: str, input_size: tuple[int, int, int]) -> None:
    """The rewritten trunk runs at ``input_size`` and gives the original's output shapes (no state changes)."""
    a, b = (m.get_submodule(trunk) if trunk else m for m in (model, new))
    x = torch.zeros(1, *input_size, device=model_device(a))
    with eval_mode(a, b), torch.no_grad():
        try:
            shapes = [[list(y.shape) for y in output_tensors(m(x))] for m in (a, b)]
        except RuntimeError as e:
            raise SurgeryError(f"the model does not run at input_size {list(input_size)} ({first_line(e)}); "
                               "pass the size it takes (--input-size)") from None
    if shapes[0] != shapes[1]:
        raise SurgeryError(f"at input_size {list(input_size)} the converted model's outputs have shapes "
                           f"{shapes[1]}, the original's {shapes[0]}")


def _under(trunk: Trunk, r: Rewrite) -> Rewrite:
    """``r`` with the trunk's module names as full paths in the whole model (its block name already is one)."""
    if not trunk.name:
        return r
    p = trunk.path
    r.convs = {p(k): p(v) for k, v in r.convs.items()}
    r.norms = [p(n) for n in r.norms]
    r.keys = {p(k): p(v) for k, v in r.keys.items()}
    return r


def _replace_trunk(model: nn.Module, trunk: Trunk, new: nn.Module) -> nn.Module:
    """Put ``new`` (the pruned GraphModule) where the trunk was; a whole-model trunk is replaced outright."""
    if not trunk.name:
        return new
    # Plain attributes the rest of the model reads (BackboneWithFPN.out_channels) travel with it.
    for key, value in vars(trunk.module).items():
        if not key.startswith("_") and key != "training" and not hasattr(new, key):
            setattr(new, key, value)
    model.set_submodule(trunk.name, new)
    return model
