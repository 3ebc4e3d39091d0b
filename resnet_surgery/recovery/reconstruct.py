"""Block reconstruction (BRECQ-style): every parameter of each rewritten block optimised so that, fed with
the input the converted model now gives it, the block reproduces the original block's output.

Three guards make it safe at any scale: the learning rate is relative to each tensor's RMS magnitude (Adam's
step is about the rate whatever the weight's size, so an absolute rate tuned on one model is too large on
another); a held-back error that rises above the best so far sends the block back to its best iterate at a
third of the rate; and each block keeps its best iterate by its error on held-back calibration images it
never trains on, or stays as it was when no iterate beat it."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..defaults import RECONSTRUCT_ITERATIONS, RECONSTRUCT_LR
from ..engine import find_blocks, find_trunk, trace
from ..errors import SurgeryError
from ..utils import eval_mode, model_device
from .activations import capture, execution_order, named_module, run_hooked, submodule
from .budget import expired
from .crops import CROP_MARGIN, RECONSTRUCT_CROP, Crop, crop_plan

__all__ = ["HOLD_BACK", "held_back", "RECONSTRUCT_BATCH", "RECONSTRUCT_BYTES", "RECONSTRUCT_CHECKS", "RECONSTRUCT_CROP",
           "RECONSTRUCT_ITERATIONS", "RECONSTRUCT_LR", "RECONSTRUCT_WORK", "BlockFit", "macs_per_image", "previous_blocks",
           "reconstruct_blocks"]

# Block reconstruction's mini-batch (its iterations per block and peak rate, relative to each tensor's RMS, are
# in defaults, which the command line reads without importing torch).
RECONSTRUCT_BATCH = 64
# Fraction of the cached images held back to choose the best iterate; held-back checks per block.
HOLD_BACK = 0.125
RECONSTRUCT_CHECKS = 10
# A held-back error above the best so far cuts the rate to this fraction and restarts from the best iterate.
BACK_OFF = 1 / 3
# A tensor whose RMS is below this (a zero-initialised bias) moves as if it were this large.
RMS_FLOOR = 1e-3
# Cached block inputs and targets stay under this size; past it, fewer calibration images are used (all 2,048
# for the CIFAR models' blocks; at 224 px, 106 to 426 of ResNet-50's, whose capture passes cost minutes).
RECONSTRUCT_BYTES = 512 << 20
# The default iterations stop where iterations x the unit's MACs per (cropped) image would pass this: all 500
# for the CIFAR models' blocks (12M MACs), 20 to 70 for ResNet-50's at 224 px (170M-590M MACs), so a large
# model's reconstruction costs minutes of CPU, not an hour. An explicit ``iterations`` is never capped.
RECONSTRUCT_WORK = 12_000_000_000


@dataclasses.dataclass
class BlockFit:
    """The reconstruction of one rewritten block: its output error against the original block's output.

    Args:
        block: the rewritten block.
        previous: the block before it, optimised with it (None: the block alone).
        images: calibration images whose inputs and targets were cached (the held-back ones included).
        iterations: optimiser steps.
        error_before: squared error relative to the target's per-channel variance on the held-back images, before.
        error_after: the same for the block as returned (never above error_before).
        cpu_seconds: process CPU time the block took.
        held_out: images held back from training, on which the errors are measured.
        kept: "best at iteration k" or "original (no improvement)".
        back_offs: times a held-back error above the best sent the block back to its best iterate at a third
            of the rate.
        following: blocks after it trained with it (``after``); the errors are then at the last one's output.
    """

    block: str
    previous: str | None  # the block before it, optimised with it (None: the block alone)
    images: int  # calibration images whose inputs and targets were cached
    iterations: int
    error_before: float  # squared error relative to the target's per-channel variance, on the held-back images
    error_after: float
    cpu_seconds: float
    held_out: int = 0
    kept: str = ""
    back_offs: int = 0  # times the rate was cut to BACK_OFF after a held-back error rose
    following: list[str] = dataclasses.field(default_factory=list)  # blocks after it trained with it



def _unit_io(model: nn.Module, original: nn.Module, unit: nn.Module, first: str, name: str, batches,
             max_bytes: int, device):
    """The inputs of ``model``'s block ``first`` (from ``model`` as it is now) and the outputs of ``original``'s
    block ``name`` on ``batches``, concatenated on the CPU; stops adding batches once ``max_bytes`` would be
    passed."""
    start, ref = model.get_submodule(first), original.get_submodule(name)
    inputs, targets, size = [], [], 0
    for images, _ in batches:
        images = images.to(device)
        x, y = capture(model, start, images, "input"), capture(original, ref, images, "output")
        if not inputs and unit(x[:1]).shape[1:] != y.shape[1:]:
            raise SurgeryError(f"block {name} yields {tuple(unit(x[:1]).shape[1:])} but the original's yields "
                               f"{tuple(y.shape[1:])}; reconstruction needs the same output shape")
        per_image = (x[0].numel() + y[0].numel()) * 4
        room = (max_bytes - size) // per_image
        if room <= 0:
            break
        inputs.append(x[:room].float().cpu())
        targets.append(y[:room].float().cpu())
        size += per_image * len(inputs[-1])
    if not inputs:
        raise SurgeryError(f"one calibration image's activations at block {name} exceed the cache "
                           f"({max_bytes} bytes); raise max_bytes")
    return torch.cat(inputs), torch.cat(targets)


def _relative_error(unit: nn.Module, x: torch.Tensor, y: torch.Tensor, device, chunk: int = 256) -> float:
    """sum |unit(x) - y|^2 over the target's sum of squared deviations from its per-channel means."""
    dims = [0, *range(2, y.dim())]
    var = ((y - y.mean(dim=dims, keepdim=True)) ** 2).sum().double()
    err = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            out = unit(x[i : i + chunk].to(device)).float().cpu()
            err += ((out - y[i : i + chunk]) ** 2).sum().double()
    return float(err / var.clamp_min(1e-30))


def previous_blocks(model: nn.Module, blocks: Sequence[str] | None, images: torch.Tensor) -> dict[str, str | None]:
    """For each block in ``blocks``, the residual block whose output *is* its input (None when it reads
    anything else, e.g. the stem), found by running ``model`` once on ``images``.

    Args:
        model: the model to run.
        blocks: names of residual blocks of ``model`` (None: every residual block that is a module).
        images: the input batch.

    Returns:
        dict: {block: the block before it, or None}.
    """
    names = [b.name for b in find_blocks(trace(model))]
    modules = {n: m for n in names if (m := submodule(model, n)) is not None}
    blocks = list(modules) if blocks is None else blocks
    outputs: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _, __, out, n=n: outputs.__setitem__(n, out)) for n, m in modules.items()]
    handles += [model.get_submodule(n).register_forward_pre_hook(lambda _, args, n=n: inputs.__setitem__(n, args[0]))
                for n in blocks]
    run_hooked(model, handles, images)
    return {n: next((p for p, out in outputs.items() if p != n and out is inputs.get(n)), None) for n in blocks}


def _check_block_modules(model: nn.Module, blocks: Sequence[str]) -> None:
    """Reconstruction trains each block as one module: refuse, up front, a block whose layers share no parent
    (find_blocks then names it by its add node)."""
    loose = [n for n in blocks if submodule(model, n) is None]
    if loose and set(loose) <= {b.name for b in find_trunk(model).blocks}:
        raise SurgeryError(f"block reconstruction needs each residual block to be one module; block {loose[0]} "
                           "is not (its layers share no parent module): calibrate with steps=('bn', 'transfer')")


def held_back(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices, held-back indices) of ``n`` images, a seeded split (``HOLD_BACK`` of them held back).

    Args:
        n: how many images.
        seed: seed of the split.

    Returns:
        tuple: the two index tensors, sorted; a single image is in both.
    """
    if n < 2:
        return torch.arange(n), torch.arange(n)
    held = max(1, round(n * HOLD_BACK))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[held:].sort().values, perm[:held].sort().values


def _relative_groups(params: list[torch.Tensor], lr: float) -> list[dict]:
    """One Adam group per tensor at ``lr`` times its RMS: Adam moves a weight by about its rate whatever the
    weight's size, so a relative rate means the same fraction of a typical weight in every model."""
    return [{"params": [p], "lr": lr * max(float(p.detach().pow(2).mean().sqrt()), RMS_FLOOR)} for p in params]


@dataclasses.dataclass
class _Best:
    """The best iterate so far by the held-back error: its error, its iteration (0: the original), its values;
    and the error it started from."""

    before: float
    error: float
    iteration: int
    values: list[torch.Tensor]
    back_offs: int = 0

    def offer(self, error: float, iteration: int, params: list[torch.Tensor]) -> bool:
        """Keep the parameters' current values when ``error`` is finite and no worse than the best; False when
        it is worse."""
        if not (math.isfinite(error) and error <= self.error):
            return False
        if error < self.error:
            self.error, self.iteration = error, iteration
            self.values = [p.detach().clone() for p in params]
        return True


def macs_per_image(module: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of ``module`` on one image shaped like ``x[0]`` (torch's flop counter; eval mode,
    no gradients: the module does not change).

    Args:
        module: the module to count.
        x: a batch of its input (only the first image runs).

    Returns:
        int: the MACs.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with eval_mode(module), torch.no_grad(), counter:
        module(x[:1])
    return counter.get_total_flops() // 2


def default_iterations(unit: nn.Module, x: torch.Tensor) -> int:
    """RECONSTRUCT_ITERATIONS, or fewer where the unit's MACs per image ``x[:1]`` would pass RECONSTRUCT_WORK.

    Args:
        unit: the blocks trained together.
        x: an input batch as the unit is trained on (a crop when it trains on crops).

    Returns:
        int: the iterations, at least RECONSTRUCT_CHECKS.
    """
    return max(RECONSTRUCT_CHECKS, min(RECONSTRUCT_ITERATIONS, RECONSTRUCT_WORK // max(1, macs_per_image(unit, x))))


def _optimise(unit: nn.Module, train: tuple, held: tuple, *, iterations: int, lr: float, batch_size: int,
              generator: torch.Generator, device, desc: str, progress: bool, bf16: bool = False,
              channels_last: bool = False, crop: Crop | None = None) -> _Best:
    """Train every parameter of ``unit`` (in place) to map ``train``'s inputs to its targets: MSE, Adam at ``lr``
    relative to each tensor's RMS with a cosine schedule, ``iterations`` mini-batches drawn with ``generator``.
    Every ``iterations // RECONSTRUCT_CHECKS`` steps and at the end the error on ``held`` is measured; an error
    above the best so far sends the unit back to its best iterate at a third of the rate (``BACK_OFF``). ``unit``
    ends at the best iterate, or as it was when none beat it (a non-finite loss backs off the same way)."""
    (x, y), params = train, [p for p in unit.parameters() if p.requires_grad]
    start = _relative_error(unit, *held, device)
    best = _Best(start, start, 0, [p.detach().clone() for p in params])
    opt = torch.optim.Adam(_relative_groups(params, lr))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, iterations))
    every = max(1, iterations // RECONSTRUCT_CHECKS)
    try:
        with torch.enable_grad():
            for i in tqdm(range(1, iterations + 1), desc=desc, disable=not progress, leave=False):
                if expired():  # recover's time limit: keep the best iterate so far
                    break
                pick = torch.randint(len(x), (min(batch_size, len(x)),), generator=generator)
                inputs, targets = crop.draw(x[pick], y[pick], generator) if crop else (x[pick], y[pick])
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                    out = unit(_batch(inputs, device, channels_last))
                if crop:
                    out = crop.interior(out)
                loss = F.mse_loss(out.float(), targets.to(device))
                finite = bool(torch.isfinite(loss))
                if finite:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                sched.step()
                if not finite:
                    _back_off(best, params, opt, sched)  # diverged: restart from the best iterate, slower
                elif i % every == 0 or i == iterations:
                    error = _relative_error(unit, *held, device)
                    if not best.offer(error, i, params):
                        _back_off(best, params, opt, sched)
    finally:
        with torch.no_grad():
            for p, value in zip(params, best.values):
                p.grad = None
                p.copy_(value)
    return best


def _batch(x: torch.Tensor, device, channels_last: bool) -> torch.Tensor:
    """A mini-batch on ``device``, channels-last when the unit it feeds is (4-d activations only)."""
    x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def _back_off(best: _Best, params: list[torch.Tensor], opt: torch.optim.Optimizer, sched) -> None:
    """Return the parameters to the best iterate and cut every rate to ``BACK_OFF`` of itself for the rest of
    the schedule (the cosine schedule scales from the current rate, so the cut carries through)."""
    with torch.no_grad():
        for p, value in zip(params, best.values):
            p.copy_(value)
    opt.state.clear()  # Adam's moments belong to the abandoned iterates
    for group in opt.param_groups:
        group["lr"] *= BACK_OFF
    sched.base_lrs = [rate * BACK_OFF for rate in sched.base_lrs]
    best.back_offs += 1


def reconstruct_blocks(
    model: nn.Module,
    original: nn.Module,
    blocks: Sequence[str],
    batches,
    *,
    iterations: int | None = None,
    lr: float = RECONSTRUCT_LR,
    batch_size: int = RECONSTRUCT_BATCH,
    previous: bool = True,
    max_bytes: int = RECONSTRUCT_BYTES,
    seed: int = 0,
    progress: bool = True,
    after: int = 0,
    bf16: bool = False,
    channels_last: bool = False,
) -> list[BlockFit]:
    """Optimise every parameter of each block ``name`` of ``model`` (in place) so that, fed with the input
    ``model`` now gives it, it reproduces the output of ``original``'s block of the same name (MSE; Adam at
    ``lr`` times each tensor's RMS, so 3e-2 moves a weight ~3% of its typical size a step; cosine schedule;
    ``iterations`` mini-batches of ``batch_size`` from the cached activations of ``batches``; None: 500, fewer
    where a unit's MACs would pass RECONSTRUCT_WORK; maps wider than RECONSTRUCT_CROP are trained on crops).
    Blocks go in
    forward order, each on the inputs left by the ones before it (BRECQ). A seeded ``HOLD_BACK`` fraction of
    the images is never trained on; the block's error on them is measured ``RECONSTRUCT_CHECKS`` times and at
    the end: an error above the best so far restarts from the best iterate at ``BACK_OFF`` of the rate
    (BlockFit.back_offs), and the block ends at its best iterate or as it was (BlockFit.kept says which).

    With ``previous``, the block whose output is the rewritten block's input is optimised with it (when there
    is one): after a stride move that block's output is read at other positions (v1 reads 1 of 4), and it can
    move there what the rewritten block needs. Norms stay in eval mode: running statistics stay as they are.

    Args:
        model: the converted model (its blocks change in place).
        original: the original model, with blocks of the same names.
        blocks: the blocks to reconstruct.
        batches: re-iterable (images, labels) batches.
        iterations: optimiser steps per block (None: RECONSTRUCT_ITERATIONS, capped by RECONSTRUCT_WORK).
        lr: peak learning rate, relative to each parameter tensor's RMS.
        batch_size: mini-batch of cached activations per step.
        previous: optimise the block before each one with it.
        max_bytes: cap on the cached inputs and targets of one block.
        seed: seed of the held-back split and of the mini-batch draws.
        progress: show progress bars.
        after: also train up to this many blocks that follow each rewritten block (never the next rewritten
            one), against the original's output after the last of them.
        bf16: train under bfloat16 autocast (errors are still measured in float32).
        channels_last: train the block in channels-last memory format (back to contiguous when it is done).

    Returns:
        list: a BlockFit per block, in forward order.
    """
    device, _ = model_device(model), _check_block_modules(model, blocks)
    for name in blocks:
        named_module(model, name, nn.Module, "the converted model")
        named_module(original, name, nn.Module, "the original model")
    first = next(iter(batches), None)
    if first is None:
        raise SurgeryError("the calibration data yielded no images")
    settings = dict(iterations=iterations, lr=lr, batch_size=batch_size, max_bytes=max_bytes, seed=seed,
                    generator=torch.Generator().manual_seed(seed), device=device, progress=progress, bf16=bf16,
                    channels_last=channels_last)
    with eval_mode(model, original):
        with torch.no_grad():
            order = execution_order(model, list(blocks), first[0][:2].to(device))
        units = _units(model, order, first[0][:2].to(device), previous, after)
        # Under recover's time limit the blocks not begun are skipped (left as they are).
        return [_fit_unit(model, original, unit, batches, **settings) for unit in units if not expired()]


def _units(model: nn.Module, order: list[str], images: torch.Tensor, previous: bool, after: int) -> list[list]:
    """Per rewritten block (in ``order``), the chain of blocks trained together: [the block before it or None,
    the block, up to ``after`` blocks that follow it, stopping before the next rewritten block]."""
    if not previous and not after:
        return [[None, name] for name in order]
    before_of = previous_blocks(model, None, images)  # every block's predecessor, from one trace and one pass
    next_of = {prev: n for n, prev in before_of.items() if prev}
    units = []
    for name in order:
        chain = [before_of.get(name) if previous else None, name]
        while len(chain) < after + 2 and (nxt := next_of.get(chain[-1])) and nxt not in order:
            chain.append(nxt)
        units.append(chain)
    return units


def _fit_unit(model: nn.Module, original: nn.Module, chain: list, batches, *, iterations: int | None, lr: float,
              batch_size: int, max_bytes: int, seed: int, generator, device, progress: bool, bf16: bool,
              channels_last: bool) -> BlockFit:
    """Train one chain of blocks of ``model`` (in place) to reproduce ``original``'s output after its last block."""
    prev, name, following = chain[0], chain[1], chain[2:]
    names = [n for n in chain if n]
    unit = nn.Sequential(*(model.get_submodule(n) for n in names))  # shares the modules: trains in place
    start = time.process_time()
    with torch.no_grad():
        x, y = _unit_io(model, original, unit, names[0], names[-1], batches, max_bytes, device)
    fit, held = held_back(len(x), seed)
    if channels_last:
        unit.to(memory_format=torch.channels_last)
    crop = crop_plan(unit, x, y, CROP_MARGIN + len(following), device)
    if iterations is None:
        first = x[:1, ..., : crop.side, : crop.side] if crop else x[:1]  # as the unit trains on it
        iterations = default_iterations(unit, _batch(first, device, channels_last))
    try:
        best = _optimise(unit, (x[fit], y[fit]), (x[held], y[held]), iterations=iterations, lr=lr,
                         batch_size=batch_size, generator=generator, device=device, desc=f"reconstruct {name}",
                         progress=progress, bf16=bf16, channels_last=channels_last, crop=crop)
    finally:
        unit.to(memory_format=torch.contiguous_format)  # saved weights must be contiguous
    return BlockFit(name, prev, len(x), iterations, best.before, best.error, time.process_time() - start,
                    len(held), _kept(best), best.back_offs, following)


def _kept(best: _Best) -> str:
    """What the block ended as, for the report."""
    return f"best at iteration {best.iteration}" if best.iteration else "original (no improvement)"

