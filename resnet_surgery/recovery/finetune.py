"""Fine-tune a converted model by knowledge distillation from the original, in one process or under torchrun.

The same call runs unchanged under ``torchrun --nproc_per_node N``: with WORLD_SIZE > 1 in the environment
it joins the process group (gloo on CPU, nccl on GPU), wraps the student in DistributedDataParallel and
shards the data with a DistributedSampler; only rank 0 writes checkpoints and shows progress.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from ..atomic import atomic_file, check_writable
from ..data import as_loader, split_batch
from ..engine.blocks import NORM_TYPES
from ..errors import SurgeryError, first_line
from ..history import history, record_result
from ..utils import eval_mode, model_device
from ..zoo.weights import torch_load
from .calibrate import approximate_rewrites

OPTIMIZERS = {"sgd": 0.01, "adamw": 3e-4}  # name -> default learning rate
FREEZE = ("none", "rewritten")
OBJECTIVES = ("logits", "features", "both")
AUGMENTATIONS = ("none", "auto", "cifar", "imagenet")
AUTO_CIFAR_SIZE = 64  # "auto" augments images up to this size like CIFAR (pad-crop), larger ones like ImageNet
# Global pooling that ends a ResNet's trunk: its input is the feature map that objective="features" matches.
GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclasses.dataclass
class FinetuneReport:
    epochs: int
    start_epoch: int  # epochs already done when this run started (from a resumed checkpoint)
    steps: int  # optimizer steps this run took
    images: int  # training images this run saw, all processes together
    world_size: int
    distill_losses: list[float]  # distillation loss of every step (mean over processes)
    epoch_losses: list[float]  # mean distillation loss of each epoch this run completed
    cpu_seconds: float  # this process's CPU time, all threads
    wall_seconds: float
    checkpoint: str | None
    objective: str = "logits"
    budget_steps: int = 0  # optimizer steps the schedule spans

    @property
    def loss_start(self) -> float:
        k = max(1, len(self.distill_losses) // 4)
        return sum(self.distill_losses[:k]) / k if self.distill_losses else math.nan

    @property
    def loss_end(self) -> float:
        k = max(1, len(self.distill_losses) // 4)
        return sum(self.distill_losses[-k:]) / k if self.distill_losses else math.nan

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "loss_start": self.loss_start, "loss_end": self.loss_end}

    def __str__(self) -> str:
        return (
            f"epochs {self.start_epoch}->{self.start_epoch + len(self.epoch_losses)} of {self.epochs}, "
            f"{self.steps} steps, {self.images} images on {self.world_size} process(es): {self.objective} loss "
            f"{self.loss_start:.4f} -> {self.loss_end:.4f} ({self.cpu_seconds:.0f} CPU s, {self.wall_seconds:.0f} s)"
        )


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the softmax at ``temperature``, times T^2 so gradients keep their scale."""
    t = temperature
    log_s = F.log_softmax(student_logits / t, dim=1)
    log_t = F.log_softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * t * t


def _distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether this call started the process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    started = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        started = True
    return dist.get_rank(), dist.get_world_size(), started


def _train_loader(data, *, rank, world, batch_size, num_images, preset, transform, seed):
    """The training loader and the sampler to tell each epoch (None when a single process uses a given
    DataLoader as it is)."""
    if world == 1 and isinstance(data, DataLoader) and num_images is None:
        return data, None
    # as_loader turns a path into an ImageFolder and takes the seeded subset; shard and shuffle its dataset.
    base = as_loader(data, preset=preset, transform=transform, batch_size=batch_size, num_images=num_images,
                     seed=seed)
    if isinstance(base.dataset, IterableDataset):
        raise SurgeryError("fine-tuning needs a map-style Dataset (with __len__ and __getitem__), not an IterableDataset")
    sampler = DistributedSampler(base.dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    loader = DataLoader(base.dataset, batch_size=base.batch_size or batch_size, sampler=sampler,
                        num_workers=base.num_workers, collate_fn=base.collate_fn)
    return loader, sampler


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


def global_pool(model: nn.Module) -> tuple[str, list[str]]:
    """(the global pooling module that ends the trunk, the modules after it: the classifier), from the fx graph.
    Its input is the feature map that objective="features" matches."""
    from ..engine.blocks import trace

    gm = trace(model)
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    pools = [i for i, n in enumerate(nodes) if n.op == "call_module" and isinstance(modules[n.target], GLOBAL_POOLS)
             and modules[n.target].output_size in (1, (1, 1))]
    if not pools:
        raise SurgeryError(f"no global pooling module (nn.AdaptiveAvgPool2d(1)) found in {type(model).__name__}; "
                           "objective='features' needs one: use objective='logits'")
    last = pools[-1]
    after = [n.target for n in nodes[last + 1 :] if n.op == "call_module" and any(True for _ in modules[n.target].parameters())]
    return nodes[last].target, after


def _sync_buffers(model: nn.Module, world: int) -> None:
    """Average floating buffers (BatchNorm statistics) over processes and take rank 0's counters, so every
    process ends with the same state_dict."""
    if world == 1:
        return
    for b in model.buffers():
        if b.is_floating_point():
            dist.all_reduce(b)
            b /= world
        else:
            dist.broadcast(b, src=0)


def _model_fingerprint(model: nn.Module) -> str:
    """A hash of what key names and shapes do not show: every module's class, the geometry of every conv and
    pool (stride, dilation, padding, kernel), and the recipe's rewrites."""
    geometry = [
        [name, type(m).__name__, *(str(getattr(m, a, "")) for a in ("kernel_size", "stride", "padding", "dilation",
                                                                    "groups", "ceil_mode", "count_include_pad"))]
        for name, m in model.named_modules()
    ]
    recipe = history(model).recipe
    rewrites = [[r.block, str(r.op)] for r in recipe.rewrites] if recipe is not None else []
    text = json.dumps({"modules": geometry, "rewrites": rewrites})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _data_identity(data) -> str:
    if isinstance(data, (str, os.PathLike)):
        return str(Path(data).resolve())
    dataset = data.dataset if isinstance(data, DataLoader) else data
    size = len(dataset) if hasattr(dataset, "__len__") else "?"
    return f"{type(data).__name__} of {size} {type(dataset).__name__} items"


def _run_identity(model: nn.Module, data, **options) -> dict:
    """What a checkpoint belongs to: the model's fingerprint, the data and the options that shape the run."""
    return {"model": _model_fingerprint(model), "data": _data_identity(data), **options}


def _check_identity(path: Path, saved: dict | None, identity: dict | None) -> None:
    if identity is None:
        return
    if saved is None:
        raise SurgeryError(f"{path} does not record which model and options it belongs to (an older checkpoint); "
                           "start fresh with --force (force=True)")
    for key, value in identity.items():
        if saved.get(key) != value:
            what = "a different model (its modules, conv geometry or rewrites differ)" if key == "model" else (
                f"{key} {saved.get(key)!r}, not {value!r}")
            raise SurgeryError(f"{path} belongs to another run: {what}; resume with the same model, data and "
                               "options, or start fresh with --force (force=True)")


def _save_checkpoint(path: Path, model, optimizer, scheduler, *, epoch, step, epochs, losses, identity=None) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "epoch": epoch, "step": step, "epochs": epochs, "epoch_losses": losses, "identity": identity}
    with atomic_file(path, force=True) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, model, optimizer, scheduler, epochs: int, device, identity=None) -> dict:
    if not path.is_file():
        raise SurgeryError(f"no checkpoint at {path} to resume from; run without resume to start fresh")
    state = torch_load(path, map_location=device)
    if not isinstance(state, dict):
        raise SurgeryError(f"{path} is not a fine-tuning checkpoint; pass the right checkpoint or start fresh with "
                           "--force (force=True)")
    _check_identity(path, state.get("identity"), identity)
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise SurgeryError(f"{path} is not a fine-tuning checkpoint of this model ({first_line(e)}); "
                           "pass the right checkpoint or start fresh with --force (force=True)") from None
    if state["epochs"] != epochs:
        raise SurgeryError(f"{path} belongs to a run of {state['epochs']} epochs; resume with epochs={state['epochs']}")
    return state


@dataclasses.dataclass
class _Taps:
    """The pre-pool feature maps of the student and the teacher, caught by forward pre-hooks on the pool."""

    student: torch.Tensor | None = None
    teacher: torch.Tensor | None = None
    handles: list = dataclasses.field(default_factory=list)

    def attach(self, student: nn.Module, teacher: nn.Module, pool: str) -> None:
        def keep(attr):
            def hook(_, args):
                setattr(self, attr, args[0])

            return hook

        self.handles = [student.get_submodule(pool).register_forward_pre_hook(keep("student")),
                        teacher.get_submodule(pool).register_forward_pre_hook(keep("teacher"))]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def feature_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """MSE between feature maps relative to the teacher's mean square, so one learning rate suits every model."""
    return F.mse_loss(student_features, teacher_features) / teacher_features.pow(2).mean().clamp_min(1e-12)


def _augmenter(augment: str, objective: str, seed: int):
    """A function that augments a batch image by image (teacher and student then see the same images)."""
    if augment == "none" or (augment == "auto" and objective == "logits"):
        return None
    from torchvision.transforms import v2

    def build(size):
        if augment == "cifar" or (augment == "auto" and min(size) <= AUTO_CIFAR_SIZE):
            return v2.Compose([v2.RandomCrop(size, padding=min(size) // 8), v2.RandomHorizontalFlip()])
        return v2.Compose([v2.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True), v2.RandomHorizontalFlip()])

    transforms: dict = {}
    generator = torch.Generator().manual_seed(seed)

    def apply(images: torch.Tensor) -> torch.Tensor:
        size = tuple(images.shape[-2:])
        t = transforms.setdefault(size, build(size))
        # torchvision's transforms draw from the global generator: seed it from ours for reproducible runs.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
            return torch.stack([t(img) for img in images])

    return apply


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
    pool: str | None  # the global pooling module whose input objective="features" matches
    frozen: list[str]  # modules kept in eval mode with frozen parameters (the classifier, for features)
    total_steps: int
    epochs: int
    rank: int
    world: int
    train_norms: bool  # norms in train mode (batch statistics, running averages updated), else frozen statistics


def _setup(converted, original, data, *, objective, pool, freeze, optimizer, lr, weight_decay, epochs, steps, rank, world,
           batch_size, num_images, preset, transform, seed, train_norms) -> _Run:
    """Student and teacher on the device, trainable parameters, loader, optimizer and cosine schedule."""
    if torch.cuda.is_available() and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = model_device(converted)
    prefixes = _trainable_prefixes(converted, freeze)
    frozen = pool[1] if objective == "features" else []
    student = copy.deepcopy(converted).to(device)
    teacher = original if model_device(original) == device else copy.deepcopy(original).to(device)
    for name, p in student.named_parameters():
        p.requires_grad_(_inside(name, prefixes) and not _inside(name, frozen))
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise SurgeryError("nothing to train: the model has no trainable parameters")
    loader, sampler = _train_loader(data, rank=rank, world=world, batch_size=batch_size, num_images=num_images,
                                    preset=preset, transform=transform, seed=seed)
    if len(loader) == 0:
        raise SurgeryError("the training data yielded no batches; pass a non-empty dataset")
    # An iteration budget spans as many passes over the data as it needs.
    total = steps if steps is not None else epochs * len(loader)
    epochs = math.ceil(total / len(loader))
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total))
    net = student
    if world > 1:
        net = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    if train_norms is None:
        # Few images seen many times (features) give noisy batch statistics: keep the calibrated ones.
        train_norms = objective == "logits"
    return _Run(student, teacher, net, loader, sampler, opt, sched, device, prefixes, pool[0], frozen, total, epochs,
                rank, world, train_norms)


def _loss(objective, logits, teacher_logits, taps: _Taps, labels, *, temperature, alpha):
    """(the distillation term, the total loss): KL of the logits, MSE of the pre-pool features, or both; mixed
    with cross-entropy when the batch has labels."""
    terms = []
    if objective in ("logits", "both"):
        terms.append(distillation_loss(logits.float(), teacher_logits.float(), temperature))
    if objective in ("features", "both"):
        terms.append(feature_loss(taps.student.float(), taps.teacher.float()))
    distill = sum(terms)
    if labels is None:
        return distill, distill
    return distill, alpha * distill + (1 - alpha) * F.cross_entropy(logits.float(), labels)


def _train(run: _Run, report: FinetuneReport, *, objective, start_epoch, step, max_steps, augment, temperature, alpha,
           bf16, ckpt, identity, progress) -> None:
    """The training loop: epochs of steps until the budget (or ``max_steps``) is spent; a checkpoint after
    every finished epoch; a non-finite loss on any process stops all of them."""
    taps = _Taps()
    if run.pool is not None:
        taps.attach(run.student, run.teacher, run.pool)
    stop = run.total_steps if max_steps is None else min(run.total_steps, max_steps)
    try:
        with eval_mode(run.teacher):
            for epoch in range(start_epoch, run.epochs):
                if step >= stop:
                    break
                if run.sampler is not None:
                    run.sampler.set_epoch(epoch)
                _set_train_mode(run.student, run.prefixes, run.frozen, run.train_norms)
                epoch_loss, epoch_steps, finished = 0.0, 0, True
                bar = tqdm(run.loader, desc=f"fine-tune epoch {epoch + 1}/{run.epochs}",
                           disable=not progress or run.rank != 0)
                for batch in bar:
                    if step >= stop:
                        # A budget that ends inside a pass ends the run there; max_steps leaves the pass unfinished.
                        finished = step >= run.total_steps
                        break
                    images, labels = split_batch(batch)
                    images = images.to(run.device)
                    if augment is not None:
                        images = augment(images)
                    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=bf16):
                        with torch.no_grad():
                            teacher_logits = run.teacher(images)
                        logits = run.net(images)
                    distill, loss = _loss(objective, logits, teacher_logits, taps,
                                          None if labels is None else labels.to(run.device),
                                          temperature=temperature, alpha=alpha)
                    # Every process learns if any loss is not finite, so all stop together.
                    seen = torch.stack([distill.detach(), loss.detach()]).float()
                    if run.world > 1:
                        dist.all_reduce(seen)
                        seen /= run.world
                    if not torch.isfinite(seen).all():
                        raise SurgeryError(_nan_message(float(seen[1]), epoch, step, ckpt,
                                                        start_epoch + len(report.epoch_losses)))
                    run.opt.zero_grad(set_to_none=True)
                    loss.backward()
                    run.opt.step()
                    run.sched.step()
                    step += 1
                    epoch_steps += 1
                    epoch_loss += float(seen[0])
                    report.distill_losses.append(float(seen[0]))
                    report.steps += 1
                    report.images += len(images) * run.world
                    bar.set_postfix(loss=f"{float(seen[0]):.4f}")
                _sync_buffers(run.student, run.world)
                if not finished:
                    break
                report.epoch_losses.append(epoch_loss / max(1, epoch_steps))
                if ckpt is not None and run.rank == 0:
                    _save_checkpoint(ckpt, run.student, run.opt, run.sched, epoch=epoch + 1, step=step,
                                     epochs=run.epochs, losses=report.epoch_losses, identity=identity)
    finally:
        taps.remove()


def finetune(
    converted: nn.Module,
    original: nn.Module,
    data,
    *,
    objective: str = "logits",
    epochs: int = 1,
    steps: int | None = None,
    augment: str = "none",
    lr: float | None = None,
    optimizer: str | None = None,
    weight_decay: float = 0.0,
    temperature: float = 4.0,
    alpha: float = 0.9,
    freeze: str = "none",
    train_norms: bool | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    force: bool = False,
    max_steps: int | None = None,
    num_images: int | None = None,
    batch_size: int = 64,
    preset: str = "imagenet",
    transform=None,
    seed: int = 0,
    bf16: bool = False,
    progress: bool = True,
) -> nn.Module:
    """A new model: ``converted`` trained to reproduce ``original`` (the teacher, kept in eval mode).

    ``objective``: "logits" is knowledge distillation (KL at ``temperature``, scaled by T^2); "features" makes
    the student reproduce the teacher's feature map before global pooling (MSE relative to its mean square, the
    classifier frozen; MiR, Wang et al. 2022), which works from a few hundred unlabelled images; "both" adds
    the two. With labels the loss is ``alpha`` * that + (1 - ``alpha``) * cross-entropy. The budget is
    ``epochs`` passes over the data, or ``steps`` optimizer steps when given (as many passes as they need);
    ``augment`` ("cifar": pad-crop + flip, "imagenet": random resized crop + flip; "auto": none for "logits",
    else "cifar" up to 64x64 images and "imagenet" above) varies the images that a small set shows many times. SGD (momentum 0.9, Nesterov; default lr 0.01; the default for "logits") or AdamW
    (default lr 3e-4; the default for "features"/"both"), cosine schedule over the budget. ``freeze="rewritten"`` trains only the blocks the recipe rewrote.
    ``train_norms``: norms normalise with batch statistics and update their running ones (default for "logits"),
    or keep their statistics and train only their affine (default for "features"/"both").
    ``checkpoint``: written atomically after every pass (model, optimizer, scheduler, epoch, step);
    ``resume=True`` continues from it, an existing one is replaced only with ``force``. ``max_steps`` stops
    early (the schedule still spans the budget); ``num_images`` trains on a seeded subset. ``batch_size`` is
    per process. ``bf16`` runs the forward passes under bfloat16 autocast. A NaN/inf loss raises SurgeryError
    and keeps the last checkpoint. ``history(result).finetune`` is a FinetuneReport; ``converted`` is untouched.
    """
    if optimizer is None:
        optimizer = "sgd" if objective == "logits" else "adamw"  # AdamW mimicked features better (README)
    if optimizer not in OPTIMIZERS:
        raise SurgeryError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    lr = OPTIMIZERS[optimizer] if lr is None else lr
    if freeze not in FREEZE:
        raise SurgeryError(f"unknown freeze {freeze!r}; choose one of {', '.join(FREEZE)}")
    if objective not in OBJECTIVES:
        raise SurgeryError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if augment not in AUGMENTATIONS:
        raise SurgeryError(f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTATIONS)}")
    if epochs < 1 or (steps is not None and steps < 1) or temperature <= 0 or not 0 <= alpha <= 1:
        raise SurgeryError("need epochs >= 1, steps >= 1, temperature > 0 and 0 <= alpha <= 1")
    if not approximate_rewrites(converted):
        raise SurgeryError("the conversion is exact (no approximate rewrites): the model already computes the "
                           "original's function, so there is nothing to fine-tune")
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if resume and ckpt is None:
        raise SurgeryError("resume needs the checkpoint path of the run to continue")
    if ckpt is not None and ckpt.exists() and not resume and not force:
        raise SurgeryError(f"checkpoint {ckpt} already exists; resume from it (--resume) or pass --force to start over")
    if ckpt is not None:
        check_writable(ckpt, force=True)  # now, not after the first epoch
    # Traced once, before any work: a model without a global pooling module is refused here.
    pool = global_pool(converted) if objective != "logits" else (None, [])

    rank, world, started_group = _distributed()
    try:
        run = _setup(converted, original, data, objective=objective, pool=pool, freeze=freeze, optimizer=optimizer, lr=lr,
                     weight_decay=weight_decay, epochs=epochs, steps=steps, rank=rank, world=world,
                     batch_size=batch_size, num_images=num_images, preset=preset, transform=transform, seed=seed,
                     train_norms=train_norms)
        start_epoch = step = 0
        identity = _run_identity(converted, data, objective=objective, optimizer=optimizer, lr=lr, freeze=freeze,
                                 steps=steps, augment=augment, train_norms=train_norms, num_images=num_images,
                                 batch_size=batch_size, world_size=world, seed=seed, temperature=temperature, alpha=alpha)
        if resume:
            state = _load_checkpoint(ckpt, run.student, run.opt, run.sched, run.epochs, run.device, identity)
            start_epoch, step = state["epoch"], state["step"]
        report = FinetuneReport(run.epochs, start_epoch, 0, 0, world, [], [], 0.0, 0.0, str(ckpt) if ckpt else None,
                                objective=objective, budget_steps=run.total_steps)
        cpu, wall = time.process_time(), time.perf_counter()
        _train(run, report, objective=objective, start_epoch=start_epoch, step=step, max_steps=max_steps,
               augment=_augmenter(augment, objective, seed + rank), temperature=temperature, alpha=alpha, bf16=bf16,
               ckpt=ckpt, identity=identity, progress=progress)
        report.cpu_seconds, report.wall_seconds = time.process_time() - cpu, time.perf_counter() - wall
        if world > 1:
            dist.barrier()  # the checkpoint is complete before any process returns
    finally:
        if started_group:
            dist.destroy_process_group()
    return _finish(run.student, report)


def _finish(student: nn.Module, report: FinetuneReport) -> nn.Module:
    """The trained student, in eval mode with every parameter trainable again, carrying its report."""
    for p in student.parameters():
        p.requires_grad_(True)
    student.eval()
    summary = {k: v for k, v in report.to_dict().items() if k != "distill_losses"}
    record_result(student, "finetune", report, summary)
    return student


def _nan_message(loss: float, epoch: int, step: int, ckpt: Path | None, good_epochs: int) -> str:
    where = f"the loss became {loss} in epoch {epoch + 1} (step {step + 1}); fine-tuning stopped"
    if ckpt is not None and good_epochs > 0:
        return f"{where}. The last good checkpoint (epoch {good_epochs}) is kept at {ckpt}: lower the learning rate and resume"
    return f"{where} before any epoch finished, so no checkpoint was written: lower the learning rate and retry"
