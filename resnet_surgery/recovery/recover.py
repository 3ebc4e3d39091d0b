"""Recover the accuracy a conversion lost in one call, to a target within a budget.

`recover` runs the recovery steps in the order the cost measurements favour (README, "What recovery costs"):
BatchNorm re-estimation, then block reconstruction ("calibrate"), then feature mimicking in rounds of doubling
steps while a round still pays, then, with labels, fine-tuning (distillation plus cross-entropy) in rounds of
doubling steps. After every stage the model is measured on held-back images it never trains on; a stage that
left it worse is undone, so the model returned is never worse than the one before. It stops as soon as the
target is met, the budget is spent (the stage in flight stops at a step boundary, see `budget`), or the last
stage stops paying. A checkpoint after every stage lets a killed run resume.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from ..arguments import checked_arguments, with_overrides
from ..atomic import check_writable
from ..data import as_dataset, disjoint_subsets, held_out_split, preprocessing
from ..defaults import EVAL_IMAGES, RECOVER_STAGES
from ..errors import SurgeryError
from ..history import history, record_result
from ..utils import check_model, eval_mode, model_device
from .batches import Batches
from .budget import expired, time_limit
from .calibrate import approximate_rewrites, calibrate
from .checkpoint import run_identity
from .evaluate import Scores, check_label_classes, score
from .finetune import finetune
from .recover_inputs import check_budget, check_stages, check_target_and_budget
from .recover_report import RecoveryReport, RecoveryStage, format_seconds
from .recover_state import load_state, save_state

__all__ = ["EVAL_IMAGES", "MIN_GAIN", "RECOVER_STAGES", "RecoverOptions", "check_stages", "check_target_and_budget",
           "recover"]

# A round of feature mimicking or fine-tuning pays when it closes the gap by at least MIN_GAIN points or cuts the
# held-back KL by at least MIN_KL_CUT of itself; otherwise the stage ends (the next one, or the run).
MIN_GAIN = 0.1
MIN_KL_CUT = 0.05
FEATURE_STEPS = 500  # the first round of feature mimicking (the smallest measured budget); each next doubles
MAX_ROUNDS = 6  # rounds per stage: up to 64x the first
MIN_ROUND_STEPS = 20  # a round the budget cuts below this is not run


@dataclasses.dataclass(frozen=True)
class RecoverOptions:
    """How `recover` measures and runs its stages (the target and budget are its own arguments).

    Args:
        eval_images: held-back images every stage is measured on (taken from ``data`` unless ``eval_data``).
        eval_data: separate held-back images (None: ``eval_images`` of ``data`` are held back).
        calibrate_images: images calibration and feature mimicking use (a seeded subset of the rest).
        iterations: reconstruction steps per block (None: `calibrate`'s default).
        stages: the stages to run, a subset of RECOVER_STAGES (always run in that order).
        labels: use the data's labels when it has them (class folders): the gap is then top-1 points, and
            fine-tuning runs; False measures agreement with the original only.
        min_gain: a round pays when it closes the gap by at least this many points (or cuts KL by 5%).
        batch_size: images per batch.
        preset: the preprocessing preset of a path (None: see ``transform``).
        transform: the preprocessing of a path's images (None: the preset's, else the one the model's
            weights were published with, else imagenet's; `preprocessing`).
        seed: seed of the splits, subsets and training.
        channels_last: calibrate and train in channels-last memory format (faster on CPUs).
        bf16: train under bfloat16 autocast (CPUs with AVX-512 BF16/AMX, GPUs).
    """

    eval_images: int = EVAL_IMAGES
    eval_data: object = None
    calibrate_images: int = 2048
    iterations: int | None = None
    stages: tuple[str, ...] = RECOVER_STAGES
    labels: bool = True
    min_gain: float = MIN_GAIN
    batch_size: int = 64
    preset: str | None = None
    transform: object = None
    seed: int = 0
    channels_last: bool = True
    bf16: bool = False


@dataclasses.dataclass
class _Run:
    """One recovery between its stages."""

    model: nn.Module  # the best so far: what comes back
    original: nn.Module
    work: Dataset  # what fine-tuning trains on (the data less the held-back images)
    calib: Dataset  # what calibration and feature mimicking use
    held: list  # held-back (images, labels) batches
    reference: torch.Tensor  # the original's logits on them
    labelled: bool
    options: RecoverOptions
    report: RecoveryReport
    image_seconds: float  # one image's forward pass, probed
    echo: object
    progress: bool
    checkpoint: Path | None
    identity: dict
    spent: tuple[float, float] = (0.0, 0.0)  # (cpu, wall) of earlier runs resumed from
    start: tuple[float, float] = (0.0, 0.0)
    step_seconds: dict = dataclasses.field(default_factory=dict)  # stage -> measured wall seconds per step
    measure_seconds: float = 0.0

    def total(self) -> tuple[float, float]:
        return (self.spent[0] + time.process_time() - self.start[0],
                self.spent[1] + time.perf_counter() - self.start[1])

    def left(self) -> float:
        budget = self.report.budget_seconds
        return math.inf if budget is None else budget - self.total()[1]


@checked_arguments
def recover(converted: nn.Module, original: nn.Module, data, *, target: float | None = None,
            budget: float | None = None, options: RecoverOptions | None = None,
            checkpoint: str | os.PathLike | None = None, resume: bool = False, force: bool = False,
            progress: bool = True, echo=print, **overrides) -> nn.Module:
    """A new model: ``converted`` recovered towards ``original`` stage by stage (see the module's docstring).

    Args:
        converted: the converted model (untouched).
        original: the model it was converted from.
        data: images to recover on (an ImageFolder path, a Dataset or a DataLoader's dataset); with class
            folders its labels measure top-1 and train the fine-tuning stage.
        target: stop once the gap is at most this many points (top-1 points below the original with labels,
            else the percentage of images classified otherwise than by the original); None: no target.
        budget: wall seconds the whole recovery may take (None: no limit).
        options: how to measure and run the stages (None: RecoverOptions()).
        checkpoint: a file written after every stage; with ``resume`` the run continues from it.
        resume: continue from ``checkpoint`` (the budget counts the time already spent).
        force: start over, replacing an existing ``checkpoint``.
        progress: show progress bars of the stages.
        echo: prints one line per stage.
        **overrides: `RecoverOptions` fields, e.g. ``recover(converted, original, "images/", stages=("bn",))``.

    Returns:
        Module: the best model measured; ``history(result).recovery`` is its RecoveryReport.

    Raises:
        SurgeryError: bad options, data or checkpoint (before any work), or a stage that failed.
        TypeError: an argument or options field of the wrong type, or an unknown field.
    """
    check_model(converted, "converted")
    check_model(original, "original")
    options = with_overrides(RecoverOptions, options, overrides, "recover()")
    _check_arguments(converted, target, budget, options)
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists() and not (resume or force):
        raise SurgeryError(f"a recover checkpoint exists at {path}: continue it with --resume (resume=True) or "
                           "start over with --force (force=True)")
    if path is not None:
        check_writable(path, force=True)  # now, not after the first stage
    run = _prepare(converted, original, data, target, budget, options, path, progress, echo)
    position = _resume(run, converted, path) if resume else (0, 0)
    if position == (0, 0) and not run.report.stages:
        _measure(run, "naive copy", "", run.model, time.process_time(), time.perf_counter())
    _stages(run, position)
    if path is not None:
        path.unlink(missing_ok=True)  # the finished model replaces it
    model = run.model
    record_result(model, "recovery", run.report, run.report.to_dict())
    return model


def _resume(run: _Run, converted: nn.Module, path: Path | None) -> tuple[int, int]:
    """Continue from the checkpoint: the best model, the stages measured and the time spent so far."""
    if path is None:
        raise SurgeryError("resume needs the checkpoint to resume from; pass checkpoint=")
    state = load_state(path, converted, run.identity)
    run.model, run.report.stages, run.spent = state["model"], state["stages"], state["spent"]
    run.step_seconds, run.measure_seconds = state["step_seconds"], state["measure_seconds"]
    return state["position"]


def _check_arguments(converted: nn.Module, target, budget, options: RecoverOptions) -> None:
    """Every option checked before any work (the fields' types were checked by with_overrides)."""
    check_target_and_budget(target, budget)
    check_stages(options.stages)
    if min(options.eval_images, options.calibrate_images, options.batch_size, options.iterations or 1) < 1:
        raise SurgeryError("recover needs eval_images, calibrate_images, iterations and batch_size >= 1")
    if not (math.isfinite(options.min_gain) and options.min_gain >= 0):
        raise SurgeryError(f"recover's min_gain must be a finite number >= 0, not {options.min_gain}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SurgeryError("recover runs in one process; under torchrun use `resnet-surgery finetune` for the "
                           "fine-tuning itself")
    if not approximate_rewrites(converted):  # (a model without a recipe is an error there)
        raise SurgeryError("the conversion is exact (no approximate rewrites): the model already computes the "
                           "original's function, so there is nothing to recover")


def _prepare(converted, original, data, target, budget, options: RecoverOptions, path, progress, echo) -> _Run:
    """The run's data, the original's logits on the held-back images, and the budget checked against a probe."""
    o = options
    transform = preprocessing(original, o.preset, o.transform)
    dataset = as_dataset(data, transform=transform)
    work, held = held_out_split(dataset, o.eval_data, keep=None, hold=o.eval_images, transform=transform, seed=o.seed,
                                too_few="recover needs at least two images: some to recover on, some held back")
    labelled = o.labels and _has_labels(held) and _has_labels(work)
    if labelled:
        check_label_classes(converted, held, "the held-back images")
    else:
        work, held = _ImagesOnly(work), _ImagesOnly(held)
    calib = disjoint_subsets(work, [o.calibrate_images], o.seed)[0]
    item = held[0]
    image = (item[0] if isinstance(item, tuple | list) else item)[None].to(model_device(original))
    image_seconds = _probe(original, image)
    check_budget(budget, original, image, len(calib), len(held), image_seconds)
    batches = list(Batches(torch.utils.data.DataLoader(held, batch_size=o.batch_size)))
    reference, top1 = _reference(original, batches, progress)
    report = RecoveryReport(target, budget, "top-1" if labelled else "agreement", len(held), top1)
    identity = run_identity(converted, data, target=target, stages=list(o.stages), seed=o.seed, iterations=o.iterations,
                            eval_images=len(held), calibrate_images=len(calib), labels=labelled)
    run = _Run(copy.deepcopy(converted), original, work, calib, batches, reference, labelled, o, report,
               image_seconds, echo, progress, path, identity)
    run.start = (time.process_time(), time.perf_counter())
    return run


class _ImagesOnly(Dataset):
    """A dataset's images without their labels (recover told not to use them)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        return item[0] if isinstance(item, tuple | list) else item


def _has_labels(dataset: Dataset) -> bool:
    item = dataset[0]
    return (isinstance(item, tuple | list) and len(item) > 1
            and (isinstance(item[1], int) or (isinstance(item[1], torch.Tensor) and item[1].dim() == 0)))


def _probe(original: nn.Module, image: torch.Tensor) -> float:
    """Seconds of one image's forward pass through ``original`` (``image`` 8 times, after one warm-up)."""
    images = image.expand(8, *image.shape[1:]).contiguous()
    with eval_mode(original), torch.no_grad():
        original(images[:1])
        start = time.perf_counter()
        original(images)
    return (time.perf_counter() - start) / len(images)


def _reference(original: nn.Module, batches: list, progress: bool) -> tuple[torch.Tensor, float | None]:
    """The original's logits on the held-back batches, and its top-1 there (None without labels)."""
    scores, logits = Scores(), []
    device = model_device(original)
    with eval_mode(original), torch.no_grad():
        for images, labels in batches:
            out = original(images.to(device))
            if not isinstance(out, torch.Tensor) or out.dim() != 2:
                raise SurgeryError("recover needs a classifier (N x classes logits); calibrate a detection or "
                                   "segmentation model with `resnet-surgery calibrate`")
            logits.append(out.float().cpu())
            scores.add(out, labels, None)
    return torch.cat(logits), scores.report(0.0).top1


# --- the stages ------------------------------------------------------------------------------------------


def _bn(run: _Run, size: int | None) -> tuple[nn.Module, str]:
    o = run.options
    model = calibrate(run.model, run.original, run.calib, num_images=None, steps=("bn",), batch_size=o.batch_size,
                      seed=o.seed, progress=run.progress, channels_last=o.channels_last)
    return model, f"{history(model).calibration.steps[-1].images} images"


def _calibrate(run: _Run, size: int | None) -> tuple[nn.Module, str]:
    o = run.options
    model = calibrate(run.model, run.original, run.calib, num_images=None, steps=("reconstruct",),
                      iterations=o.iterations, batch_size=o.batch_size, seed=o.seed, progress=run.progress, bf16=o.bf16,
                      channels_last=o.channels_last)
    iterations = "/".join(str(n) for n in dict.fromkeys(b.iterations for b in history(model).calibration.blocks))
    return model, f"{iterations or 0} it./block" + (" (cut)" if expired() else "")


def _features(run: _Run, steps: int) -> tuple[nn.Module, str]:
    # Without the labels: cross-entropy pulls the features away from the original's, and the guard, which
    # judges the feature error, then undid every round (CIFAR v1.5 -> v1).
    return _train(run, _ImagesOnly(run.calib), "features", steps)


def _finetune(run: _Run, steps: int) -> tuple[nn.Module, str]:
    # Distillation of the logits and the features, plus cross-entropy: the best-paying fine-tuning measured.
    return _train(run, run.work, "both", steps)


def _train(run: _Run, data: Dataset, objective: str, steps: int) -> tuple[nn.Module, str]:
    o = run.options
    # "auto" augments "features" and "both" by image size (pad-crop up to 64 px, else random resized crops):
    # many steps on few images need it.
    # Unguarded: recover judges the round itself on held-back images (and undoes it when worse); fine-tuning's
    # own guard, the distillation error on 256 of the training images, undid rounds that raised held-back top-1.
    model = finetune(run.model, run.original, data, objective=objective, steps=steps, augment="auto",
                     batch_size=o.batch_size, seed=o.seed, bf16=o.bf16, channels_last=o.channels_last,
                     guard=False, progress=run.progress)
    ran = history(model).finetune.steps  # fewer when the time limit stopped it
    return model, f"{ran} steps" + (f" of {steps} (cut)" if ran < steps else "")


_STAGES = {"bn": _bn, "calibrate": _calibrate, "features": _features, "finetune": _finetune}


def _first_steps(run: _Run, stage: str) -> int | None:
    """The first round's size: None for the one-round stages, steps for the others."""
    if stage == "features":
        return FEATURE_STEPS
    if stage == "finetune":  # a quarter of a pass over the labelled images
        return max(MIN_ROUND_STEPS, math.ceil(len(run.work) / run.options.batch_size / 4))
    return None


def _fitted(run: _Run, stage: str, steps: int | None) -> int | None:
    """The round's size cut to what the budget has left (0: nothing fits)."""
    left = run.left() - run.measure_seconds
    if steps is None or math.isinf(left):
        return steps if left > 0 else 0
    # A step is a forward and backward pass of the student (about 3 forwards) and the teacher's forward.
    per_step = run.step_seconds.get(stage, 4 * run.options.batch_size * run.image_seconds)
    fits = int(left / per_step)
    return min(steps, fits) if fits >= MIN_ROUND_STEPS else 0


def _stages(run: _Run, position: tuple[int, int]) -> None:
    """Run the stages from ``position`` (stage index, round) until the target, the budget or the last stage."""
    plan = [s for s in RECOVER_STAGES if s in run.options.stages and (s != "finetune" or run.labelled)]
    if _met(run):
        return _stop(run, "target met")
    pays = True
    for index in range(position[0], len(plan)):
        stage, first = plan[index], _first_steps(run, plan[index])
        for round_ in range(position[1] if index == position[0] else 0, 1 if first is None else MAX_ROUNDS):
            size = _fitted(run, stage, None if first is None else first * 2**round_)
            if size == 0:
                return _stop(run, "budget spent")
            pays = _round(run, stage, size, (index, round_ + 1) if first is not None else (index + 1, 0))
            if _met(run):
                return _stop(run, "target met")
            if run.left() <= run.measure_seconds:
                return _stop(run, "budget spent")
            if not pays:
                break
        if first is not None and index == len(plan) - 1 and not pays:
            return _stop(run, "stopped paying")
    _stop(run, "all stages run")


def _round(run: _Run, stage: str, size: int | None, after: tuple[int, int]) -> bool:
    """One stage (or round of one); the model kept when it is no worse. Returns whether it paid."""
    cpu, wall = time.process_time(), time.perf_counter()
    with time_limit(run.left() - run.measure_seconds):
        model, budget = _STAGES[stage](run, size)
    before = run.report.best
    done = _measure(run, stage, budget, model, cpu, wall)
    if size is not None:  # learnt whether or not the round was kept
        steps = history(model).finetune.steps
        if steps:
            run.step_seconds[stage] = max(1e-6, done.wall_seconds - run.measure_seconds) / steps
    if run.checkpoint is not None:
        save_state(run.checkpoint, run.model, identity=run.identity, position=after, spent=run.total(),
                   stages=run.report.stages, step_seconds=run.step_seconds, measure_seconds=run.measure_seconds)
    return (done.kept and (before.gap - done.gap >= run.options.min_gain
                           or done.kl <= (1 - MIN_KL_CUT) * before.kl))


def _no_worse(run: _Run, gap: float, kl: float, agreement: float) -> bool:
    """Whether a stage's model is no worse than the best so far. Without labels by KL (agreement moves in whole
    images; KL is the finer measure of the same thing). With labels: KL no higher and the gap no more than one
    standard error of a paired top-1 difference higher, or the gap lower by more than that (top-1 on 2,000
    images moves by tenths of a point by chance: on the trained ResNet-50 a round of feature mimicking that
    cut KL by 15% and raised test top-1 by 0.45 read 0.30 worse there)."""
    if not run.report.stages:
        return True
    best = run.report.best
    if not run.labelled:
        return kl <= best.kl
    # Images the two models classify differently are at most those either classifies unlike the original.
    n = len(run.reference)
    discordant = max(1.0, (200.0 - best.agreement - agreement) / 100 * n)
    noise = 100.0 * math.sqrt(discordant) / n
    return (kl <= best.kl and gap <= best.gap + noise) or gap < best.gap - noise


def _met(run: _Run) -> bool:
    return run.report.target is not None and run.report.gap <= run.report.target


def _stop(run: _Run, why: str) -> None:
    run.report.stopped, run.report.met = why, _met(run)


def _measure(run: _Run, stage: str, budget: str, model: nn.Module, cpu: float, wall: float) -> RecoveryStage:
    """Measure ``model`` on the held-back images, keep it when it is no worse than the best, record the stage."""
    start = time.perf_counter()
    report = score(model, run.reference, run.held, f"held-back after {stage}", run.progress).report(0.0)
    if stage == "naive copy":
        run.measure_seconds = time.perf_counter() - start
    top1 = report.top1
    gap = run.report.original_top1 - top1 if run.labelled else 100.0 - report.agreement
    if not all(math.isfinite(v) for v in (gap, report.kl)):
        raise SurgeryError(f"recover's {stage} stage left the model's outputs non-finite; check the data")
    kept = _no_worse(run, gap, report.kl, report.agreement)
    total_cpu, total_wall = run.total()
    done = RecoveryStage(stage, budget, time.process_time() - cpu, time.perf_counter() - wall, gap, top1,
                         report.agreement, report.kl, kept, total_cpu, total_wall)
    run.report.stages.append(done)
    if kept:
        run.model = model
    left = "" if math.isinf(run.left()) else f"; {format_seconds(max(0.0, run.left()))} of the budget left"
    top = f" (top-1 {top1:.2f} vs {run.report.original_top1:.2f})" if top1 is not None else ""
    run.echo(f"recover: {stage:<10} {budget:<18} gap {gap:.2f}{top}, KL {report.kl:.4f}, "
             f"{done.wall_seconds:.1f} s{'' if kept else ', undone (worse)'}{left}")
    return done
