"""Recover the accuracy an approximate rewrite costs, without labels.

`calibrate` repairs the rewritten blocks of a converted model on a few unlabelled images: BatchNorm
re-estimation (`batchnorm`), then block reconstruction (`reconstruct`: every parameter of each rewritten
block optimised so that the block reproduces the original block's output, BRECQ-style) or a least-squares
refit of every rewritten conv (`refit`). A detection model is calibrated on its trunk (the backbone its
recipe names: the images go straight into it, so preprocess them as the model's transform would; the
"imagenet" preset's mean and std are those of torchvision's GeneralizedRCNNTransform), and a model whose
output is not class logits (pyramid levels, segmentation maps) is measured by its outputs' mean relative
error ||f - f_orig|| / ||f_orig|| over images and output tensors instead of top-1 agreement. Fine-tuning (distillation, feature
mimicking) lives in `finetune`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Sequence

import torch
from torch import nn

from ..arguments import checked_arguments, with_overrides
from ..data import DataSpec, preprocessing
from ..defaults import MAX_STEPS
from ..engine import full_name
from ..errors import SurgeryError
from ..history import history, record_result
from ..utils import check_model, model_device
from .activations import named_module
from .batches import Batches, first_images, select_batches
from .batchnorm import reestimate_bn
from .evaluate import EvalReport, gives_logits, output_error, score
from .options import DEFAULT_STEPS, CalibrateOptions
from .reconstruct import BlockFit, held_back, macs_per_image, reconstruct_blocks
from .refit import ConvFit, transfer_weights

__all__ = ["BN_WORK", "CALIBRATION_STEPS", "DEFAULT_STEPS", "MEASURE_MIN", "CalibrationReport", "CalibrationStep", "approximate_rewrites",
           "calibrate", "check_steps"]

CALIBRATION_STEPS = ("bn", "transfer", "reconstruct")
# Steps are measured on the images reconstruction holds back when there are at least this many of them (512
# calibration images and up), else on all the calibration images (a few held-back images are noise).
MEASURE_MIN = 64
# BatchNorm re-estimation (two passes: the model and the original) reads at most this many MACs' worth of images
# per model: all 2,048 for the CIFAR models, about 490 for a ResNet-50 at 224 px, whose statistics over 49 to
# 3,136 positions an image are settled long before (the pass over all 1,024 took 350 CPU s there).
BN_WORK = 2_000_000_000_000


@dataclasses.dataclass
class CalibrationStep:
    """One calibration step: what it cost and where it left the model (measured on the held-back calibration
    images, the seeded eighth that reconstruction never trains on; on all of them when that is fewer than
    MEASURE_MIN images).

    Args:
        step: "naive copy", "bn", "transfer" or "reconstruct".
        images: calibration images the step used (0 for the naive copy).
        passes: forward passes over them.
        cpu_seconds: process CPU time, all threads.
        wall_seconds: wall time.
        agreement: against the original model (only num_images when the outputs are not logits).
        output_error: for outputs that are not class logits, the mean relative error over images and outputs.
    """

    step: str  # "naive copy" | "bn" | "transfer"
    images: int  # calibration images the step used (0 for the naive copy)
    passes: int  # forward passes over them
    cpu_seconds: float  # process CPU time, all threads
    wall_seconds: float
    agreement: EvalReport  # against the original model (only num_images when the outputs are not logits)
    # Outputs that are not class logits: mean over images and output tensors of ||f - f_orig|| / ||f_orig||.
    output_error: float | None = None


@dataclasses.dataclass
class CalibrationReport:
    """What `calibrate` did: the agreement after every step, and the refits and reconstructions it made.

    Args:
        num_images: calibration images.
        ridge: the refit's ridge.
        steps: the naive copy, then each step, measured on the held-back calibration images (see MEASURE_MIN).
        fits: the refit of every rewritten conv ("transfer").
        blocks: the reconstruction of every rewritten block ("reconstruct").
    """

    num_images: int
    ridge: float
    steps: list[CalibrationStep]
    fits: list[ConvFit]
    blocks: list[BlockFit] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        if self.steps and self.steps[0].output_error is not None:
            lines = [f"{'step':<12} {'images':>7} {'cpu s':>8} {'output error':>13}"]
            lines += [f"{s.step:<12} {s.images:>7} {s.cpu_seconds:>8.1f} {s.output_error:>13.4f}" for s in self.steps]
            return "\n".join(lines + self._fit_lines())
        lines = [f"{'step':<12} {'images':>7} {'cpu s':>8} {'agreement':>10} {'KL':>8} {'top-1':>7}"]
        for s in self.steps:
            a = s.agreement
            top1 = f"{a.top1:.2f}" if a.top1 is not None else "-"
            lines.append(f"{s.step:<12} {s.images:>7} {s.cpu_seconds:>8.1f} {a.agreement:>9.2f}% {a.kl:>8.4f} {top1:>7}")
        return "\n".join(lines + self._fit_lines())

    def _fit_lines(self) -> list[str]:
        lines = []
        for f in self.fits:
            # Fewer equations than unknowns: the fit reproduces the calibration images, not the function.
            few = f" (only {f.rows} positions for {f.unknowns} weights: use more images)" if f.rows < 4 * f.unknowns else ""
            lines.append(f"  refit {f.conv} -> {f.target}: relative error {f.error_before:.4f} -> {f.error_after:.4f}{few}")
        for b in self.blocks:
            name = " + ".join(n for n in (b.previous, b.block, *b.following) if n)
            lines.append(f"  reconstruct {name}: relative error {b.error_before:.4f} -> {b.error_after:.4f} on "
                         f"{b.held_out} held-back images, kept {b.kept}{_backed_off(b)} ({b.iterations} iterations on "
                         f"{b.images - b.held_out} images, {b.cpu_seconds:.1f} CPU s)")
        return lines


def _backed_off(fit: BlockFit) -> str:
    """", rate cut N times" when reconstruction backed off its learning rate."""
    return f", rate cut {fit.back_offs}x" if fit.back_offs else ""


class _CPUTimer:
    """Process CPU time and wall time of a ``with`` block."""

    def __enter__(self):
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu, self.wall = time.process_time() - self.cpu, time.perf_counter() - self.wall


def approximate_rewrites(model: nn.Module) -> list:
    """The Rewrites of ``history(model).recipe`` (earlier conversions of a chain included) that change the function.

    Args:
        model: a model returned by `convert` or loaded with `load`.

    Returns:
        list: its approximate Rewrites, earliest conversion first.
    """
    recipe = history(model).recipe
    if recipe is None:
        raise SurgeryError(
            "the model has no recipe; calibrate and finetune need a model returned by "
            "resnet_surgery.convert() or loaded with resnet_surgery.load()"
        )
    # Earlier conversions of a chain (e.g. an approximate v1, then an exact prune) count too.
    return [r for step in [*recipe.history, recipe] for r in step.rewrites if not r.exact]


def check_steps(steps: Sequence[str]) -> None:
    """One SurgeryError naming the first step that is not a calibration step.

    Args:
        steps: calibration step names to check against CALIBRATION_STEPS.
    """
    if unknown := [s for s in steps if s not in CALIBRATION_STEPS]:
        raise SurgeryError(f"unknown calibration step {unknown[0]!r}; choose from {', '.join(CALIBRATION_STEPS)}")


def _trunks(converted: nn.Module, original: nn.Module, trunk: str | None) -> tuple[nn.Module, nn.Module]:
    """What calibration runs on: both models' trunk when the recipe names one (a detection model's backbone,
    which takes the normalised image batch), else the models themselves."""
    if not trunk:
        return converted, original
    return (named_module(converted, trunk, nn.Module, "the converted model"),
            named_module(original, trunk, nn.Module, "the original model"))


def _in_trunk(name: str, trunk: str | None) -> str:
    """A recipe's full module path relative to the trunk."""
    return name.removeprefix(f"{trunk}.") if trunk else name


def _full_names(report, trunk: str | None) -> None:
    """The report's conv and block names as full paths in the whole model, as the recipe names them."""
    if not trunk:
        return
    def full(name):  # a missing previous block stays None
        return full_name(trunk, name) if name else name

    for f in report.fits:
        f.conv, f.target = full(f.conv), full(f.target)
    for b in report.blocks:
        b.block, b.previous, b.following = full(b.block), full(b.previous), [full(n) for n in b.following]


@checked_arguments
def calibrate(converted: nn.Module, original: nn.Module, data, *, options: CalibrateOptions | None = None,
              progress: bool = True, **overrides) -> nn.Module:
    """A new model: ``converted`` with its approximately rewritten blocks repaired on unlabelled ``data``.

    Steps, in the order given: "bn" re-estimates the rewritten blocks' BatchNorm statistics on the new
    activations; "transfer" refits each rewritten conv by ridge least squares to reproduce ``original``'s conv
    output (then "bn" again when it is among the steps); "reconstruct" trains every parameter of each rewritten
    block, in forward order, to reproduce the original block's output (see `reconstruct_blocks`: a rate
    relative to each tensor's RMS, the best iterate on held-back images kept; the step is undone when the
    model's KL on those images rose). ``converted`` is untouched; deterministic under ``seed``; non-finite
    options or results are errors. A detection model is calibrated on its trunk and comes back whole; outputs
    that are not class logits are measured by their relative error (see the module's docstring).

    Args:
        converted: the converted model (untouched).
        original: the model it was converted from.
        data: an ImageFolder path (preprocessed by the options' ``transform`` or ``preset``), a Dataset or a
            DataLoader.
        options: the steps and their settings (None: CalibrateOptions()).
        progress: show progress bars.
        **overrides: fields of CalibrateOptions to set on ``options`` (``steps=("bn",)``, ``iterations=200``).

    Returns:
        Module: the calibrated copy; ``history(result).calibration`` is its CalibrationReport.

    Raises:
        SurgeryError: bad options or data, an exact conversion (nothing to repair), or a non-finite result.
        TypeError: an argument of the wrong type, or an override that is not a CalibrateOptions field.
    """
    check_model(converted, "converted")
    check_model(original, "original")
    o = with_overrides(CalibrateOptions, options, overrides, "calibrate()")
    records = _checked_rewrites(converted, o.steps, o.iterations, o.lr, o.ridge)
    spec = DataSpec(data, transform=preprocessing(original, o.preset, o.transform), num_images=o.num_images,
                    batch_size=o.batch_size, seed=o.seed, progress=progress)
    settings = _Settings(tuple(o.steps), o.iterations, o.lr, o.previous, o.ridge, o.after, o.bf16, o.channels_last)
    run = _prepare(converted, original, records, spec, settings)
    _measure(run, "naive copy", None, 0, 0)
    for step in dict.fromkeys(o.steps):
        with _CPUTimer() as timer:
            images, passes = _STEPS[step](run)
        _measure(run, step, timer, images, passes)
    run.body.to(memory_format=torch.contiguous_format)  # saved weights must be contiguous
    _check_finite(run)
    _full_names(run.report, run.trunk)
    record_result(run.model, "calibration", run.report, run.report.to_dict())
    return run.model


def _checked_rewrites(converted: nn.Module, steps: Sequence[str], iterations: int | None, lr: float,
                      ridge: float) -> list:
    """The approximate rewrites to repair, once the options are checked; an exact conversion is an error."""
    check_steps(steps)
    for option, value in (("lr", lr), ("ridge", ridge)):
        if not math.isfinite(value):
            raise SurgeryError(f"calibrate's {option} must be a finite number, not {value}")
    if ridge < 0:
        raise SurgeryError(f"calibrate's ridge must be >= 0, not {ridge}")
    if (iterations is not None and not 1 <= iterations <= MAX_STEPS) or lr <= 0:  # a diverging rate is cut back
        raise SurgeryError(f"reconstruction needs iterations from 1 to {MAX_STEPS:.0e} and lr > 0, not {iterations} "
                           f"and {lr}")
    records = approximate_rewrites(converted)
    if not records:
        raise SurgeryError("the conversion is exact (no approximate rewrites): the model already computes the "
                           "original's function, so there is nothing to calibrate")
    return records


@dataclasses.dataclass(frozen=True)
class _Settings:
    """What the calibration steps are told besides the data."""

    steps: tuple[str, ...]
    iterations: int | None
    lr: float
    previous: bool
    ridge: float
    after: int = 0
    bf16: bool = False
    channels_last: bool = False


@dataclasses.dataclass
class _Run:
    """One calibration between its steps: the trunks it works on, what to repair, the cached batches."""

    model: nn.Module  # the copy of the converted model that comes back
    body: nn.Module  # the copy's trunk (the whole copy when it traces whole): repaired in place
    reference_body: nn.Module
    trunk: str | None
    norms: list[str]
    convs: dict[str, str]
    blocks: list[str]
    batches: Batches
    logits: bool  # whether the trunk's output is class logits (else it is measured by its relative error)
    spec: DataSpec
    settings: _Settings
    report: CalibrationReport
    held: list | Batches  # what every step is measured on: the held-back images (see MEASURE_MIN), in batches
    reference: object = None  # reference_body, replaced by its logits on the held-back images once measured
    measured: EvalReport | None = None  # a step's measurement taken by the step itself (the guard's)


def _prepare(converted: nn.Module, original: nn.Module, records: list, spec: DataSpec, settings: _Settings) -> _Run:
    """The run's state on a copy of ``converted``: every step runs on the trunk (the whole model when it traces
    whole), with names relative to it."""
    trunk = history(converted).recipe.trunk
    model = copy.deepcopy(converted)
    body, reference_body = _trunks(model, original, trunk)
    if settings.channels_last:  # the original is the caller's: a copy changes format
        body.to(memory_format=torch.channels_last)
        reference_body = copy.deepcopy(reference_body).to(memory_format=torch.channels_last)
    norms = [_in_trunk(n, trunk) for r in records for n in r.norms]
    convs = {_in_trunk(c, trunk): _in_trunk(t, trunk) for r in records for c, t in r.convs.items()}
    blocks = list(dict.fromkeys(_in_trunk(r.block, trunk) for r in records))
    batches = Batches(spec.loader())
    logits = gives_logits(body, batches)
    report = CalibrationReport(num_images=sum(len(images) for images, _ in batches), ridge=settings.ridge, steps=[],
                               fits=[])
    held = _held_batches(batches, report.num_images, spec.seed, spec.batch_size)
    if sum(len(images) for images, _ in held) < MEASURE_MIN:
        held = batches
    return _Run(model, body, reference_body, trunk, norms, convs, blocks, batches, logits, spec, settings, report,
                held, reference=reference_body)


def _held_batches(batches: Batches, n: int, seed: int, batch_size: int) -> list:
    """The calibration images reconstruction holds back (its seeded split of all ``n``), with their labels, in
    batches: the steps are measured on them (images reconstruction never trains on, and a pass over an eighth
    of the images instead of all of them: at 224 px each full pass costs minutes of CPU)."""
    return select_batches(batches, held_back(n, seed)[1].tolist(), batch_size)


def _measure(run: _Run, step: str, timer: _CPUTimer | None, images: int, passes: int) -> None:
    """Add the step's CalibrationStep: agreement with the original (or output error) on the held-back images."""
    cpu, wall = (timer.cpu, timer.wall) if timer else (0.0, 0.0)
    if not run.logits:
        error, n = output_error(run.body, run.reference_body, run.held, f"output error after {step}",
                                run.spec.progress)
        run.report.steps.append(CalibrationStep(step, images, passes, cpu, wall, EvalReport(num_images=n), error))
        return
    measured, run.measured = run.measured or _agreement(run, step), None
    run.report.steps.append(CalibrationStep(step, images, passes, cpu, wall, measured))


def _measured_on(run: _Run) -> str:
    return "calibration images" if run.held is run.batches else "held-back images"


def _agreement(run: _Run, step: str) -> EvalReport:
    """Agreement, KL and top-1 (with labels) against the original on the held-back images."""
    scores = score(run.body, run.reference, run.held, f"agreement after {step}", run.spec.progress)
    if scores.ref_logits:
        run.reference = torch.cat(scores.ref_logits)  # the original's logits are computed once
    return scores.report(0.0)


def _check_finite(run: _Run) -> None:
    """A calibrated model with a non-finite parameter, statistic or output is an error, never returned."""
    bad = next((n for n, t in run.body.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()),
               None)
    last = run.report.steps[-1]
    measure = last.output_error if last.output_error is not None else last.agreement.kl
    if bad is not None or (measure is not None and not math.isfinite(measure)):
        where = f"{bad} is not finite" if bad else "its outputs are not finite"
        raise SurgeryError(f"calibration failed: after step {last.step!r} {where}; check the data and lower lr")


def _bn_step(run: _Run) -> tuple[int, int]:
    """The "bn" step; returns (images, passes)."""
    images = reestimate_bn(run.body, run.norms, _bn_batches(run), reference=run.reference_body,
                           progress=run.spec.progress)
    return images, 1


def _bn_batches(run: _Run) -> list:
    """The calibration batches BatchNorm re-estimation reads: the first images up to BN_WORK MACs (counted
    here, before the re-estimation hooks its norms)."""
    macs = macs_per_image(run.body, next(iter(run.batches))[0][:1].to(model_device(run.body)))
    return first_images(run.batches, max(1, BN_WORK // max(1, macs)))


def _transfer_step(run: _Run) -> tuple[int, int]:
    """The "transfer" step, then BatchNorm re-estimation again when "bn" is among the steps."""
    progress = run.spec.progress
    run.report.fits = transfer_weights(run.body, run.reference_body, run.convs, run.batches,
                                       ridge=run.settings.ridge, progress=progress)
    passes = len(run.convs)
    if "bn" in run.settings.steps:
        # The refits changed the activations the re-estimated statistics describe.
        reestimate_bn(run.body, run.norms, _bn_batches(run), reference=run.reference_body, progress=progress)
        passes += 1
    return run.report.num_images, passes


def _reconstruct_step(run: _Run) -> tuple[int, int]:
    """The "reconstruct" step; undone when it left the model's KL to the original on the held-back images worse
    (each block improved its own error, but the model's outputs are what counts). Judged on the whole step:
    a block's repair can raise the KL until the blocks after it are repaired too. The KLs are the measurements
    of the step before and of this one (on the same images), so the guard costs no pass of its own."""
    s = run.settings
    state = copy.deepcopy(run.body.state_dict())
    run.report.blocks = reconstruct_blocks(run.body, run.reference_body, run.blocks, run.batches,
                                           iterations=s.iterations, lr=s.lr, previous=s.previous,
                                           seed=run.spec.seed, progress=run.spec.progress, after=s.after,
                                           bf16=s.bf16, channels_last=s.channels_last)
    if run.logits:
        before, after = run.report.steps[-1].agreement, _agreement(run, "reconstruct")
        run.measured = after
        if not after.kl <= before.kl:
            run.body.load_state_dict(state)
            run.measured = before
            for b in run.report.blocks:
                b.error_after = b.error_before
                b.kept = (f"original (the model's KL on the {_measured_on(run)} rose {before.kl:.4g} -> "
                          f"{after.kl:.4g})")
    return min((b.images for b in run.report.blocks), default=0), len(run.blocks)


_STEPS = {"bn": _bn_step, "transfer": _transfer_step, "reconstruct": _reconstruct_step}
