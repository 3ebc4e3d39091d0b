"""Move weights between two implementations of the same ResNet whose module names differ, by structure.

Both models are traced with torch.fx and their residual blocks found from the dataflow (``blocks.py``);
the modules holding weights are then paired in the same order on both sides: the stem (everything
before the first block), each block (its main-path convs and norms in forward order, then its
shortcut's, then anything else inside it, e.g. an SE gate), what lies between blocks, and the head
(what follows the last block). Every pair must agree in shape, kernel, stride, padding, dilation,
groups and bias. Where the two differ in stride placement (v1 vs v1.5) or shortcut form (conv1x1,
avgpool, conv3x3), the target is first converted with ``convert`` to the source's form, so the result
computes what the source computes, and its recipe replays the conversion on ``load``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from ..arguments import checked_arguments
from ..errors import SurgeryError
from ..history import Source, history, record
from ..utils import check_model, image_size, model_device, private_copy
from ..vocab import Layout, Shortcut
from .blocks import Block, find_blocks, find_trunk, model_variant, trace
from .probe import max_difference
from .recipe import Options, new_recipe
from .rewrite import SurgeryNotice, convert

__all__ = [
    "CONVERTIBLE_SHORTCUTS", "CONVERT_TO", "CONV_ATTRIBUTES", "OPTIONAL_KEYS", "Section", "match",
    "sections", "transplant",
]

CONV_ATTRIBUTES = ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
OPTIONAL_KEYS = ("num_batches_tracked",)  # BatchNorm has it, FrozenBatchNorm2d and GroupNorm do not
CONVERTIBLE_SHORTCUTS = (Shortcut.CONV1X1, Shortcut.CONV3X3, Shortcut.AVGPOOL)
CONVERT_TO = {Layout.V1: ("v1", False), Layout.V1_5: ("v1.5", False), Layout.V1_5_DILATED: ("v1.5", True)}


@dataclass
class Section:
    """The weight-holding modules of one part of a model (stem, a block, a gap between blocks, the head)."""

    label: str  # "stem", "block 3", "between blocks 3 and 4", "head"
    name: str  # the block's name, or a short description
    modules: list[str] = field(default_factory=list)


def _holds_state(m: nn.Module) -> bool:
    return bool(m.state_dict())


def sections(gm: fx.GraphModule, blocks: list[Block]) -> list[Section]:
    """The weight-holding modules of ``gm`` split into stem, blocks, gaps and head, each in forward order."""
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    stateful = [n for n in nodes if n.op == "call_module" and _holds_state(modules[n.target])]
    for a, b in zip(blocks, blocks[1:]):
        if index[b.input] < index[a.add]:
            raise SurgeryError(f"blocks {a.name} and {b.name} overlap in the forward (parallel branches?): "
                               "transplant needs blocks that follow each other")

    def between(lo: int, hi: int) -> list[str]:
        return [n.target for n in stateful if lo < index[n] <= hi]

    out = [Section("stem", "stem", between(-1, index[blocks[0].input]))]
    for i, b in enumerate(blocks):
        if i:
            gap = between(index[blocks[i - 1].add], index[b.input])
            if gap:
                out.append(Section(f"between blocks {i} and {i + 1}", f"after {blocks[i - 1].name}", gap))
        main = [n.target for n in b.main if n in stateful]
        shortcut = [n.target for n in b.shortcut if n in stateful]
        side = [m for m in between(index[b.input], index[b.add]) if m not in main and m not in shortcut]
        out.append(Section(f"block {i + 1}", b.name, main + shortcut + side))
    out.append(Section("head", "head", between(index[blocks[-1].add], len(nodes))))
    seen = set()
    for s in out:  # a module called twice belongs where it is first called
        s.modules = [m for m in s.modules if not (m in seen or seen.add(m))]
    return out


def _check_covered(model: nn.Module, secs: list[Section], which: str) -> None:
    """Every parameter must sit in a module that was placed: one used directly in a forward cannot be paired."""
    placed = {f"{m}.{k}" for s in secs for m in s.modules for k, _ in model.get_submodule(m).named_parameters()}
    loose = [k for k, _ in model.named_parameters() if k not in placed]
    if loose:
        raise SurgeryError(f"the {which} parameter {loose[0]} is used directly in a forward, not through a module "
                           "the trace can see (pass its module in leaf_modules=...): transplant cannot place it")


# --- matching the two layouts ----------------------------------------------------------------------------


def _stride_on(block: Block) -> str:
    # a block with no layout (stride 1, not a dilated stage) must not fail inside the error message
    return block.layout.stride_on if block.layout is not None else "no conv (stride 1)"


def _conversion(src: list[Block], tgt: list[Block]) -> tuple[str | None, bool, str | None, list[str], str]:
    """What ``convert`` call puts the target's blocks in the source's stride placement and shortcut form:
    (to, exact, shortcut, the target blocks it changes, the new form in words)."""
    if len(src) != len(tgt):
        raise SurgeryError(f"source has {len(src)} blocks, target {len(tgt)}: they are not the same network")
    to, exact, shortcut, changed = set(), False, set(), []
    for i, (s, t) in enumerate(zip(src, tgt)):
        if s.stride != t.stride:
            raise SurgeryError(f"block {i + 1}: source {s.name} downsamples by {s.stride}, target {t.name} by "
                               f"{t.stride}: they are not the same network")
        if s.layout != t.layout:
            if s.layout not in CONVERT_TO or t.layout in (None, Layout.OTHER, Layout.NOT_APPLICABLE):
                raise SurgeryError(f"block {i + 1}: source {s.name} has its stride on the {_stride_on(s)}, "
                                   f"target {t.name} on the {_stride_on(t)}: no conversion maps one to the other")
            name, ex = CONVERT_TO[s.layout]
            to.add(name)
            exact |= ex
            changed.append(t.name)
        if s.shortcut_type != t.shortcut_type:
            if s.shortcut_type not in CONVERTIBLE_SHORTCUTS or t.shortcut_type not in CONVERTIBLE_SHORTCUTS:
                raise SurgeryError(f"block {i + 1}: source {s.name} has a {s.shortcut_type} shortcut, target {t.name} "
                                   f"a {t.shortcut_type} one: they are not the same network")
            shortcut.add(s.shortcut_type)
            changed.append(t.name)
    if len(to) > 1 or len(shortcut) > 1:
        raise SurgeryError(f"the source mixes stride placements or shortcuts ({', '.join(sorted(to | shortcut))}); "
                           "transplant converts the whole target to one form")
    form = " and ".join([*(f"{t}{' (dilated)' if exact else ''}" for t in to), *(f"{s} shortcuts" for s in shortcut)])
    projections = {b.shortcut_type for b in src if b.downsamples and b.shortcut_type in CONVERTIBLE_SHORTCUTS}
    if to and not shortcut and len(projections) == 1:
        shortcut = projections  # keep the shortcuts as they are: convert(to=v1/v1.5) would reset an avgpool one
    return (to.pop() if to else None), exact, (shortcut.pop() if shortcut else None), changed, form


def _pruned(blocks: list[Block]) -> bool:
    return any(b.shortcut_type == Shortcut.SUBSAMPLE for b in blocks)


def _convert_target(target: nn.Module, to, exact: bool, shortcut, input_size, leaf_modules,
                    prune_dead: bool = False) -> nn.Module:
    # transplant says what changed in its own words, so convert's notices are not shown
    if exact:  # the dilated form is what exact=True makes of v1: go through v1 (and swap shortcuts there)
        target = convert(target, "v1", shortcut=shortcut, input_size=input_size, leaf_modules=leaf_modules, warn=False)
    return convert(target, to, shortcut=shortcut, exact=exact, prune_dead=prune_dead, input_size=input_size,
                   leaf_modules=leaf_modules, warn=False)


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _pair_tensors(src: nn.Module, sname: str, tgt: nn.Module, tname: str) -> list[tuple[str, str]]:
    """The state keys to copy from ``src`` to ``tgt``; SurgeryError naming the first thing that differs."""
    a, b = src.state_dict(), tgt.state_dict()
    for key in [*a, *b]:
        if key in OPTIONAL_KEYS or (key in a and key in b):
            continue
        has, lacks = (f"source {sname}", f"target {tname}") if key in a else (f"target {tname}", f"source {sname}")
        raise SurgeryError(f"{has} has a {key} ({type(src).__name__ if key in a else type(tgt).__name__}), "
                           f"{lacks} has none ({type(tgt).__name__ if key in a else type(src).__name__})")
    pairs = []
    for key in [k for k in b if k in a]:
        if a[key].shape != b[key].shape and not _same_head(src, tgt, a[key], b[key]):
            suffix = "" if key == "weight" else f" ({key})"
            raise SurgeryError(f"{sname} {_shape(a[key])} vs {tname} {_shape(b[key])}{suffix}")
        pairs.append((key, key))
    if isinstance(src, nn.Conv2d) and isinstance(tgt, nn.Conv2d):
        for attr in CONV_ATTRIBUTES:
            if getattr(src, attr) != getattr(tgt, attr):
                raise SurgeryError(f"{sname} {attr} {getattr(src, attr)} vs {tname} {attr} {getattr(tgt, attr)}")
    return pairs


def _same_head(src: nn.Module, tgt: nn.Module, a: torch.Tensor, b: torch.Tensor) -> bool:
    """A Linear classifier and a 1x1 conv head hold the same matrix."""
    kinds = {type(src), type(tgt)}
    one_by_one = all(m.kernel_size == (1, 1) for m in (src, tgt) if isinstance(m, nn.Conv2d))
    return kinds == {nn.Linear, nn.Conv2d} and one_by_one and a.squeeze().shape == b.squeeze().shape


def _eps_notice(pairs: list[tuple[str, str]], source: nn.Module, target: nn.Module) -> str | None:
    for s, t in pairs:
        a, b = getattr(source.get_submodule(s), "eps", None), getattr(target.get_submodule(t), "eps", None)
        if a is not None and b is not None and a != b:
            return (f"norm eps differs ({s} {a} vs {t} {b}): the target keeps its own, so outputs differ slightly")
    return None


def match(source_secs: list[Section], target_secs: list[Section], head: bool) -> Iterator[tuple[str, str]]:
    """(source module, target module) pairs in order; SurgeryError when a section's counts differ (raised
    when the pairing reaches it, so the caller's checks of earlier pairs come first)."""
    labels_s = [s.label for s in source_secs]
    labels_t = [s.label for s in target_secs]
    if labels_s != labels_t:
        extra = next(x for x in labels_s + labels_t if (x in labels_s) != (x in labels_t))
        raise SurgeryError(f"weights {extra} in one model only: they are not the same network")
    for s, t in zip(source_secs, target_secs):
        if s.label == "head" and not head:
            continue
        if len(s.modules) != len(t.modules):
            where = s.label if s.label in ("stem", "head") else f"{s.label} ({s.name} vs {t.name})"
            raise SurgeryError(f"{where}: source has {len(s.modules)} modules with weights "
                               f"({', '.join(s.modules[:4])}{', ...' if len(s.modules) > 4 else ''}), "
                               f"target {len(t.modules)} ({', '.join(t.modules[:4])}"
                               f"{', ...' if len(t.modules) > 4 else ''})" + (_HEAD_HINT if s.label == "head" else ""))
        yield from zip(s.modules, t.modules)


_HEAD_HINT = "; pass head=False (--no-head) to keep the target's head"


# --- the whole step ----------------------------------------------------------------------------------------


@checked_arguments
def transplant(source: nn.Module, target: nn.Module, *, head: bool = True, input_size=(3, 224, 224),
               leaf_modules=(), warn: bool = True) -> nn.Module:
    """A new model of ``target``'s class and layout carrying ``source``'s weights, paired by structure.

    Args:
        source: the model whose weights are moved (untouched).
        target: the model whose class and module names receive them (untouched). Where the two differ in
            stride placement or shortcut form, a copy of the target is first converted to the source's (the
            recipe records it, so ``save``/``load`` replay it).
        head: False leaves the target's classifier as it is (e.g. 10 classes where the source has 1000).
        input_size: (C, H, W) of the probe input that compares the two models' outputs.
        leaf_modules: module classes or names fx should not trace into.
        warn: also show the notices as SurgeryNotice warnings (they are always in the recipe).

    Returns:
        The new model; ``history(result).recipe.transplant`` holds what was paired and the output difference
        on a probe input.

    Raises:
        SurgeryError: the two are not the same network: any mismatch (block count, a shape, a kernel, stride
            or bias) is one SurgeryError naming both modules; also a model that traces only in parts or holds
            no residual block, a pruned target with an unpruned source, a parameter used outside any module,
            a conversion of the target that fails (see `convert`), or a probe output that is not finite.
        TraceError: fx cannot trace ``source`` or ``target``.
        TypeError: ``source`` or ``target`` is not a torch module, ``input_size`` not an int or (C, H, W), or
            another argument of the wrong type.
    """
    check_model(source, "source"), check_model(target, "target")
    input_size = image_size(input_size)
    sgm, sblocks = _classifier_blocks(source, leaf_modules, "source")
    tgm, tblocks = _classifier_blocks(target, leaf_modules, "target")
    new, tgm, tblocks, notices, converted = _match_form(target, sblocks, tgm, tblocks, input_size, leaf_modules)
    ssecs, tsecs = sections(sgm, sblocks), sections(tgm, tblocks)
    _check_covered(source, ssecs, "source")
    _check_covered(new, tsecs, "target")
    pairs, copies = _copy_weights(source, new, ssecs, tsecs, head)
    eps = _eps_notice(pairs, source, new)
    if eps:
        notices.append(eps)
    probe = _probe(source, new, input_size, notices) if head else None  # without the head they differ by design
    if warn:
        for note in notices:
            warnings.warn(note, SurgeryNotice, stacklevel=3)
    recipe = history(new).recipe if converted else None
    if recipe is None:  # nothing converted: a recipe that replays nothing, so `save`/`load` still work
        variant = model_variant(tblocks)
        recipe = new_recipe(target, Options(None, None, True, False, list(input_size)), variant, variant, [], [])
    summary = {
        "source": _describe(source),
        "head": head,
        "sections": [{"section": s.label, "source": _shown(s), "target": _shown(t), "modules": len(s.modules)}
                     for s, t in zip(ssecs, tsecs) if head or s.label != "head"],
        "modules": {t: s for s, t in pairs},
        "tensors": len(copies),
        "probe": probe,
    }
    recipe = dataclasses.replace(recipe, notices=notices, transplant=summary)  # transplant's notices, not convert's
    return record(new, source=history(target).source, recipe=recipe, calibration=None, finetune=None)


def _classifier_blocks(model: nn.Module, leaf_modules, which: str) -> tuple[fx.GraphModule, list[Block]]:
    """The traced model and its blocks, found the way every step finds them; a model fx traces only in parts
    (a detection model) is refused up front: transplant pairs whole models."""
    trunk = find_trunk(model, leaf_modules)
    if trunk.name:
        raise SurgeryError(f"the {which} ({type(model).__name__}) traces only in parts (its trunk is {trunk.name}): "
                           f"transplant pairs whole models; transplant into {trunk.name} of the same class instead")
    return trunk.gm, trunk.blocks


def _match_form(target: nn.Module, sblocks: list[Block], tgm: fx.GraphModule, tblocks: list[Block], input_size,
                leaf_modules):
    """A copy of the target in the source's stride placement, shortcut form and pruning:
    (model, its graph, its blocks, notices, whether it was converted)."""
    notices, pruned = [], _pruned(sblocks) and not _pruned(tblocks)
    if _pruned(tblocks) and not _pruned(sblocks):
        raise SurgeryError("the target was pruned (prune_dead) and the source was not: transplant into the unpruned "
                           "model, then convert the result with prune_dead=True (--prune-dead)")
    if pruned:
        # A pruned v1 source: prune the target the same way (exact), then pair as usual.
        target = _convert_target(target, "v1", False, None, input_size, leaf_modules, prune_dead=True)
        tgm = trace(target, leaf_modules)
        tblocks = find_blocks(tgm)
        notices.append("the source was pruned (prune_dead): the target was converted to v1 and pruned the same way; "
                       "the recipe records it")
    to, exact, shortcut, changed, form = _conversion(sblocks, tblocks)
    if not (to or shortcut):
        # A pruned target is already a new model; a copy keeps the module names, so the target's trace serves.
        new = target if pruned else private_copy(target)
        return new, tgm, tblocks, notices, pruned
    new = _convert_target(target, to, exact, shortcut, input_size, leaf_modules)
    tgm = trace(new, leaf_modules)
    tblocks = find_blocks(tgm)
    changed = list(dict.fromkeys(changed))
    shown = ", ".join(changed[:4]) + (f", ... {len(changed) - 4} more" if len(changed) > 4 else "")
    notices.append(f"the target was converted to the source's form ({form}) so that their outputs match, in "
                   f"{len(changed)} blocks ({shown}); the recipe records it")
    left = _conversion(sblocks, tblocks)[3]
    if left:
        raise SurgeryError(f"converting the target did not reach the source's form ({left[0]} still differs)")
    return new, tgm, tblocks, notices, True


def _copy_weights(source: nn.Module, new: nn.Module, ssecs: list[Section], tsecs: list[Section], head: bool):
    """Pair the sections' modules and copy every tensor: (module pairs, (source key, target key) copies)."""
    pairs, copies = [], []
    for s, t in match(ssecs, tsecs, head):
        pairs.append((s, t))
        try:
            keys = _pair_tensors(source.get_submodule(s), s, new.get_submodule(t), t)
        except SurgeryError as e:
            in_head = any(t in sec.modules for sec in tsecs if sec.label == "head")
            raise SurgeryError(f"{e}{_HEAD_HINT if in_head else ''}") from None
        copies += [(f"{s}.{a}", f"{t}.{b}") for a, b in keys]
    src_state, new_state = source.state_dict(), new.state_dict()
    with torch.no_grad():
        for a, b in copies:
            new_state[b].copy_(src_state[a].reshape(new_state[b].shape))
    return pairs, copies


def _probe(source: nn.Module, new: nn.Module, input_size, notices: list[str]) -> dict | None:
    """Both models' outputs on one probe input (when they sit on one device); a difference is a notice."""
    if model_device(source) != model_device(new):
        return None
    diff, top = max_difference(source, new, input_size)
    if diff > 1e-4 * max(top, 1e-12):
        notices.append(f"outputs differ from the source's on a probe input (max |difference| {diff:.3g}, max "
                       f"|output| {top:.3g}): something without weights differs (pooling, activations, eps)")
    return {"max_abs_diff": diff, "max_abs": top}


def _shown(section: Section) -> str:
    """A block by its name; the stem, head and gaps by the modules they hold."""
    if section.label.startswith("block"):
        return section.name
    names = section.modules
    return ", ".join(names[:3]) + (f", ... ({len(names)})" if len(names) > 3 else "") if names else "-"


def _describe(model: nn.Module) -> dict:
    """Where the source's function came from, so calibrate and finetune can rebuild it as their teacher."""
    found = history(model)
    source = found.source
    if found.recipe is not None:
        # a converted model computes its source's function only while every step kept it exactly
        kept = found.recipe.exact and found.recipe.calibration is None and found.recipe.finetune is None
        source = found.recipe.function_source if kept else Source(f"a converted {type(model).__name__}", "custom")
    if source is not None:
        return {"model": source.model, "kind": source.kind, "weights": source.weights,
                **({"weights_sha256": source.weights_sha256} if source.weights_sha256 else {})}
    return {"model": type(model).__name__, "kind": "custom"}
