"""Fine-tune a converted model by knowledge distillation from the original, in one process or under torchrun.

The same call runs unchanged under ``torchrun --nproc_per_node N``: with WORLD_SIZE > 1 in the environment
it joins the process group (gloo on CPU, nccl on GPU), wraps the student in DistributedDataParallel and
shards the data with a DistributedSampler; only rank 0 writes checkpoints and shows progress. The losses
live in `distill`, the checkpoints in `checkpoint`, the torchrun machinery in `distributed`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ..arguments import checked_arguments, with_overrides
from ..atomic import check_writable
from ..data import DataSpec, preprocessing, split_batch
from ..defaults import MAX_LR, MAX_STEPS
from ..engine import NORM_TYPES
from ..errors import SurgeryError
from ..history import record_result
from ..utils import check_model, eval_mode, model_device, state_digest
from .budget import expired
from .calibrate import approximate_rewrites
from .checkpoint import load_checkpoint, run_identity, save_checkpoint
from .distill import AUGMENTATIONS, Taps, augmenter, features_text, global_pools, training_loss
from .distributed import join_process_group, sync_buffers, train_loader
from .evaluate import gives_logits
from .finetune_report import FinetuneReport
from .guard import guard_images, keep_better, objective_error
from .options import FinetuneOptions

__all__ = ["FREEZE", "OBJECTIVES", "OPTIMIZERS", "finetune"]

OPTIMIZERS = {"sgd": 0.01, "adamw": 3e-4}  # name -> default learning rate
FREEZE = ("none", "rewritten")
OBJECTIVES = ("logits", "features", "both")


def _trainable_prefixes(converted: nn.Module, freeze: str) -> list[str] | None:
    """Module-name prefixes that train (None: the whole model)."""
    if freeze == "none":
        return None
    blocks = sorted({r.block for r in approximate_rewrites(converted)})
    if not blocks:
        raise SurgeryError("freeze='rewritten' but the conversion has no approximate rewrites; use freeze='none'")
    return blocks


def _inside(name: str, prefixes: list[str] | None) -> bool:
    return prefixes is None or any(name == p or name.startswith(p + ".") for p in prefixes)


def _set_train_mode(model: nn.Module, prefixes: list[str] | None, frozen: list[str] = (), train_norms: bool = True) -> None:
    # Frozen parts stay in eval mode so their BatchNorm statistics do not drift.
    model.eval()
    for name, m in model.named_modules():
        if _inside(name, prefixes) and not _inside(name, list(frozen)):
            m.train(train_norms or not isinstance(m, NORM_TYPES))



@dataclasses.dataclass(frozen=True)
class _Options:
    """The training settings of one run: every `finetune` argument but the models and the data."""

    objective: str
    epochs: int
    steps: int | None
    augment: str
    lr: float | None  # None until checked: the optimizer's default
    optimizer: str | None  # None until checked: the objective's default
    weight_decay: float
    temperature: float
    alpha: float
    freeze: str
    train_norms: bool | None  # as given: _Run.train_norms holds the resolved value
    checkpoint: Path | None
    resume: bool
    force: bool
    max_steps: int | None
    bf16: bool
    channels_last: bool = False


@dataclasses.dataclass
class _Run:
    """Everything one fine-tuning run holds between its phases."""

    student: nn.Module
    teacher: nn.Module
    net: nn.Module  # the student, wrapped in DistributedDataParallel under torchrun
    loader: object
    sampler: object
    opt: torch.optim.Optimizer
    sched: object
    device: torch.device
    prefixes: list[str] | None
    pools: tuple | None  # the student's and teacher's global pools (GlobalPool) whose inputs "features" matches
    frozen: list[str]  # modules kept in eval mode with frozen parameters (the classifier, for features)
    total_steps: int
    epochs: int
    rank: int
    world: int
    train_norms: bool  # norms in train mode (batch statistics, running averages updated), else frozen statistics


@checked_arguments
def finetune(converted: nn.Module, original: nn.Module, data, *, options: FinetuneOptions | None = None,
             checkpoint: str | os.PathLike | None = None, resume: bool = False, force: bool = False,
             progress: bool = True, **overrides) -> nn.Module:
    """A new model: ``converted`` trained to reproduce ``original`` (the teacher, kept in eval mode).

    With labels the loss is ``alpha`` * the objective's + (1 - ``alpha``) * cross-entropy. A NaN/inf loss raises
    SurgeryError and keeps the last checkpoint. ``converted`` is untouched. When training left the objective's
    own error worse (measured before and after, see `guard`), a copy of ``converted`` comes back instead, with a
    SurgeryNotice and the report's ``kept`` saying so (unless ``guard=False``).

    Args:
        converted: the converted model (the student starts as a copy).
        original: the teacher.
        data: an ImageFolder path (preprocessed by the options' ``transform`` or ``preset``), a Dataset or a
            DataLoader; with labels, cross-entropy joins the distillation.
        options: the objective, budget and training settings (None: FinetuneOptions()).
        checkpoint: written atomically after every pass (model, optimizer, scheduler, epoch, step).
        resume: continue from ``checkpoint``.
        force: replace an existing ``checkpoint``.
        progress: show progress bars (rank 0).
        **overrides: fields of FinetuneOptions to set on ``options`` (``objective="features"``, ``steps=500``).

    Returns:
        Module: the trained student in eval mode; ``history(result).finetune`` is its FinetuneReport.

    Raises:
        SurgeryError: bad options, data or checkpoint (before any work), an exact conversion, or a loss that
            became NaN or infinite.
        TypeError: an argument of the wrong type, or an override that is not a FinetuneOptions field.
    """
    check_model(converted, "converted")
    check_model(original, "original")
    o = with_overrides(FinetuneOptions, options, overrides, "finetune()")
    options = _checked_options(converted, _Options(
        objective=o.objective, epochs=o.epochs, steps=o.steps, augment=o.augment, lr=o.lr, optimizer=o.optimizer,
        weight_decay=o.weight_decay, temperature=o.temperature, alpha=o.alpha, freeze=o.freeze,
        train_norms=o.train_norms, checkpoint=Path(checkpoint) if checkpoint is not None else None, resume=resume,
        force=force, max_steps=o.max_steps, bf16=o.bf16, channels_last=o.channels_last))
    spec = DataSpec(data, transform=preprocessing(original, o.preset, o.transform), num_images=o.num_images,
                    batch_size=o.batch_size, seed=o.seed, progress=progress)
    _refuse_non_classifier(converted, spec)
    rank, world, started_group = join_process_group()
    try:
        run = _setup(converted, original, spec, options, rank=rank, world=world)
        report = _measured_training(run, converted, spec, options)
    finally:
        if started_group:
            dist.destroy_process_group()
    return _finish(*_guarded(run.student, converted, report, o.guard))


def _guarded(student: nn.Module, converted: nn.Module, report: FinetuneReport, guard: bool):
    """The model to return and its report: the trained student, or with the guard the input when training
    made the error worse; a non-finite student is never returned."""
    if guard or not math.isfinite(report.error_after):
        model, report.kept = keep_better(student, converted, report.error_before, report.error_after)
    else:
        model, report.kept = student, "trained (unguarded)"
    return model, report


def _measured_training(run: _Run, converted: nn.Module, spec: DataSpec, options: _Options) -> FinetuneReport:
    """The run, with the objective's error before and after it in its report."""
    images = guard_images(spec.loader())  # the same images before and after, on every process
    before = _objective_error(run, images, options, spec.batch_size)
    report = _resume_and_train(run, converted, spec, options)
    report.error_before, report.error_after = before, _objective_error(run, images, options, spec.batch_size)
    return report


def _objective_error(run: _Run, images, options: _Options, batch_size: int) -> float:
    """The student's error by the run's objective on ``images`` (see `guard`)."""
    return objective_error(run.student, run.teacher, images, objective=options.objective, pool=run.pools,
                           temperature=options.temperature, device=run.device, batch_size=batch_size)


def _checked_options(converted: nn.Module, options: _Options) -> _Options:
    """``options`` with the optimizer and learning rate resolved, once every setting and the checkpoint path
    are checked (now, not after the first epoch)."""
    optimizer = options.optimizer
    if optimizer is None:
        optimizer = "sgd" if options.objective == "logits" else "adamw"  # AdamW mimicked features better (README)
    if optimizer not in OPTIMIZERS:
        raise SurgeryError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    lr = OPTIMIZERS[optimizer] if options.lr is None else options.lr
    if options.freeze not in FREEZE:
        raise SurgeryError(f"unknown freeze {options.freeze!r}; choose one of {', '.join(FREEZE)}")
    if options.objective not in OBJECTIVES:
        raise SurgeryError(f"unknown objective {options.objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if options.augment not in AUGMENTATIONS:
        raise SurgeryError(f"unknown augmentation {options.augment!r}; choose one of {', '.join(AUGMENTATIONS)}")
    steps, temperature, alpha = options.steps, options.temperature, options.alpha
    for name, value in (("lr", lr), ("temperature", temperature), ("alpha", alpha), ("weight_decay", options.weight_decay)):
        if not math.isfinite(value):
            raise SurgeryError(f"finetune's {name} must be a finite number, not {value}")
    if not (0 < lr <= MAX_LR and 0 <= options.weight_decay <= MAX_LR):
        raise SurgeryError(f"finetune's lr must be in (0, {MAX_LR:g}] and its weight_decay in [0, {MAX_LR:g}], "
                           f"not {lr} and {options.weight_decay}")
    if max(options.epochs, steps or 1, options.max_steps or 1) > MAX_STEPS:
        raise SurgeryError(f"finetune's epochs, steps and max_steps go up to {MAX_STEPS:.0e}")
    if options.epochs < 1 or (steps is not None and steps < 1) or temperature <= 0 or not 0 <= alpha <= 1:
        raise SurgeryError("need epochs >= 1, steps >= 1, temperature > 0 and 0 <= alpha <= 1")
    if not approximate_rewrites(converted):
        raise SurgeryError("the conversion is exact (no approximate rewrites): the model already computes the "
                           "original's function, so there is nothing to fine-tune")
    ckpt = options.checkpoint
    if options.resume and ckpt is None:
        raise SurgeryError("resume needs the checkpoint path of the run to continue")
    if ckpt is not None and ckpt.exists() and not options.resume and not options.force:
        raise SurgeryError(f"checkpoint {ckpt} already exists; resume from it (--resume) or pass --force to start over")
    if ckpt is not None:
        check_writable(ckpt, force=True)  # now, not after the first epoch
    return dataclasses.replace(options, optimizer=optimizer, lr=lr)


def _refuse_non_classifier(converted: nn.Module, spec: DataSpec) -> None:
    """Distillation trains on class logits: a detection or segmentation model (boxes, maps) is refused now, from
    one image in eval mode, not after minutes of work in train mode (which wants targets)."""
    if not gives_logits(converted, (split_batch(b) for b in spec.loader())):
        raise SurgeryError(f"finetune distils class logits (one N x classes output) but {type(converted).__name__} "
                           "gives other outputs (boxes, maps): recover a detection or segmentation model with "
                           "calibrate, which fits its trunk")


def _setup(converted, original, spec: DataSpec, options: _Options, *, rank: int, world: int) -> _Run:
    """Student and teacher on the device, trainable parameters, loader, optimizer and cosine schedule."""
    if torch.cuda.is_available() and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = model_device(converted)
    prefixes = _trainable_prefixes(converted, options.freeze)
    loader, sampler = train_loader(spec, rank=rank, world=world)
    if len(loader) == 0:
        raise SurgeryError("the training data yielded no batches; pass a non-empty dataset")
    pools = global_pools(converted, original, loader) if options.objective != "logits" else None
    frozen = list(pools[0].after) if options.objective == "features" else []
    student = copy.deepcopy(converted).to(device)
    # The caller's teacher is used as it is unless it must move or change layout: then a copy does.
    shared = model_device(original) == device and not options.channels_last
    teacher = original if shared else copy.deepcopy(original).to(device)
    if options.channels_last:
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    for name, p in student.named_parameters():
        p.requires_grad_(_inside(name, prefixes) and not _inside(name, frozen))
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise SurgeryError("nothing to train: the model has no trainable parameters")
    # An iteration budget spans as many passes over the data as it needs.
    total = options.steps if options.steps is not None else options.epochs * len(loader)
    epochs = math.ceil(total / len(loader))
    if options.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=options.lr, momentum=0.9, nesterov=True, weight_decay=options.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total))
    net = student
    if world > 1:
        net = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    train_norms = options.train_norms
    if train_norms is None:
        # Few images seen many times (features) give noisy batch statistics: keep the calibrated ones.
        train_norms = options.objective == "logits"
    return _Run(student, teacher, net, loader, sampler, opt, sched, device, prefixes, pools, frozen, total, epochs,
                rank, world, train_norms)


def _resume_and_train(run: _Run, converted: nn.Module, spec: DataSpec, options: _Options) -> FinetuneReport:
    """The run from its start (or its checkpoint) to the end of its budget, timed."""
    o = options
    # lr is left out: resuming at a lower rate after a divergence is what the NaN message advises
    identity = run_identity(converted, spec.data, teacher=state_digest(run.teacher), objective=o.objective,
                            optimizer=o.optimizer, freeze=o.freeze, steps=o.steps, augment=o.augment, train_norms=o.train_norms,
                            num_images=spec.num_images, batch_size=spec.batch_size, world_size=run.world,
                            seed=spec.seed, temperature=o.temperature, alpha=o.alpha)
    start_epoch = step = 0
    if o.resume:
        state = load_checkpoint(o.checkpoint, run.student, run.opt, run.sched, run.epochs, run.device, identity,
                                lr=o.lr)
        start_epoch, step = state["epoch"], state["step"]
    report = FinetuneReport(run.epochs, start_epoch, 0, 0, run.world, [], [], 0.0, 0.0,
                            str(o.checkpoint) if o.checkpoint else None, objective=o.objective,
                            budget_steps=run.total_steps, features=features_text(run.pools))
    cpu, wall = time.process_time(), time.perf_counter()
    _train(run, report, o, start_epoch=start_epoch, step=step,
           augment=augmenter(o.augment, o.objective, spec.seed + run.rank), identity=identity, progress=spec.progress)
    report.cpu_seconds, report.wall_seconds = time.process_time() - cpu, time.perf_counter() - wall
    if run.world > 1:
        dist.barrier()  # the checkpoint is complete before any process returns
    return report


def _train(run: _Run, report: FinetuneReport, options: _Options, *, start_epoch, step, augment, identity,
           progress) -> None:
    """The training loop: epochs of steps until the budget (or ``max_steps``) is spent; a checkpoint after
    every finished epoch."""
    taps = Taps()
    if run.pools is not None:
        taps.attach(run.student, run.teacher, run.pools)
    stop = run.total_steps if options.max_steps is None else min(run.total_steps, options.max_steps)
    try:
        with eval_mode(run.teacher):
            for epoch in range(start_epoch, run.epochs):
                if step >= stop:
                    break
                step, finished, loss = _epoch(run, report, options, taps, augment, epoch=epoch, step=step,
                                              stop=stop, good_epochs=start_epoch + len(report.epoch_losses),
                                              progress=progress)
                sync_buffers(run.student, run.world)
                if not finished:
                    break
                if not all(torch.isfinite(p).all() for p in run.student.parameters()):  # never checkpoint NaN
                    raise SurgeryError(_nan_message(math.nan, epoch, step - 1, options.checkpoint,
                                                    start_epoch + len(report.epoch_losses), "the weights became"))
                report.epoch_losses.append(loss)
                if options.checkpoint is not None and run.rank == 0:
                    save_checkpoint(options.checkpoint, run.student, run.opt, run.sched, epoch=epoch + 1, step=step,
                                    epochs=run.epochs, losses=report.epoch_losses, identity=identity)
    finally:
        taps.remove()


def _epoch(run: _Run, report: FinetuneReport, options: _Options, taps: Taps, augment, *, epoch: int, step: int,
           stop: int, good_epochs: int, progress: bool) -> tuple[int, bool, float]:
    """One pass over the data, or up to step ``stop``: (the step reached, whether the pass finished, its mean
    distillation loss)."""
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
    _set_train_mode(run.student, run.prefixes, run.frozen, run.train_norms)
    epoch_loss, epoch_steps, finished = 0.0, 0, True
    bar = tqdm(run.loader, desc=f"fine-tune epoch {epoch + 1}/{run.epochs}", disable=not progress or run.rank != 0)
    for batch in bar:
        if step >= stop or (run.world == 1 and expired()):
            # A budget that ends inside a pass ends the run there; max_steps (or recover's time limit) leaves
            # the pass unfinished.
            finished = step >= run.total_steps
            break
        images, labels = split_batch(batch)
        images = images.to(run.device)
        if augment is not None:
            images = augment(images)
        if options.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        distill = _step(run, options, taps, images, labels, epoch=epoch, step=step, good_epochs=good_epochs)
        step += 1
        epoch_steps += 1
        epoch_loss += distill
        report.distill_losses.append(distill)
        report.steps += 1
        report.images += len(images) * run.world
        bar.set_postfix(loss=f"{distill:.4f}")
    return step, finished, epoch_loss / max(1, epoch_steps)


def _step(run: _Run, options: _Options, taps: Taps, images, labels, *, epoch: int, step: int,
          good_epochs: int) -> float:
    """One optimizer step; returns its distillation loss (mean over processes). A non-finite loss on any
    process stops all of them."""
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=options.bf16):
        with torch.no_grad():
            teacher_logits = run.teacher(images)
        logits = run.net(images)
    distill, loss = training_loss(options.objective, logits, teacher_logits, taps,
                                  None if labels is None else labels.to(run.device),
                                  temperature=options.temperature, alpha=options.alpha)
    # Every process learns if any loss is not finite, so all stop together.
    seen = torch.stack([distill.detach(), loss.detach()]).float()
    if run.world > 1:
        dist.all_reduce(seen)
        seen /= run.world
    if not torch.isfinite(seen).all():
        raise SurgeryError(_nan_message(float(seen[1]), epoch, step, options.checkpoint, good_epochs))
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    run.sched.step()
    return float(seen[0])


def _finish(student: nn.Module, report: FinetuneReport) -> nn.Module:
    """The trained student, in eval mode with every parameter trainable again, carrying its report."""
    for p in student.parameters():
        p.requires_grad_(True)
    student.to(memory_format=torch.contiguous_format)  # saved weights must be contiguous
    student.eval()
    summary = {k: v for k, v in report.to_dict().items() if k != "distill_losses"}
    record_result(student, "finetune", report, summary)
    return student


def _nan_message(loss: float, epoch: int, step: int, ckpt: Path | None, good_epochs: int,
                 what: str = "the loss became") -> str:
    where = f"{what} {loss} in epoch {epoch + 1} (step {step + 1}); fine-tuning stopped"
    if ckpt is not None and good_epochs > 0:
        return f"{where}. The last good checkpoint (epoch {good_epochs}) is kept at {ckpt}: lower the learning rate and resume"
    return f"{where} before any epoch finished, so no checkpoint was written: lower the learning rate and retry"
