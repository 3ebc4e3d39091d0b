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

from .atomic import atomic_file, check_writable
from .data import as_loader, split_batch
from .errors import SurgeryError, first_line
from .history import history, record_result
from .models import torch_load
from .recovery import approximate_rewrites
from .utils import eval_mode, model_device

OPTIMIZERS = {"sgd": 0.01, "adamw": 1e-4}  # name -> default learning rate
FREEZE = ("none", "rewritten")


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
            f"{self.steps} steps, {self.images} images on {self.world_size} process(es): distillation loss "
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


def _set_train_mode(model: nn.Module, prefixes: list[str] | None) -> None:
    # Frozen parts stay in eval mode so their BatchNorm statistics do not drift.
    model.eval()
    for name, m in model.named_modules():
        if _inside(name, prefixes):
            m.train()


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


def finetune(
    converted: nn.Module,
    original: nn.Module,
    data,
    *,
    epochs: int = 1,
    lr: float | None = None,
    optimizer: str = "sgd",
    weight_decay: float = 0.0,
    temperature: float = 4.0,
    alpha: float = 0.9,
    freeze: str = "none",
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

    Loss: ``alpha`` * KL at ``temperature`` (scaled by T^2) + (1 - ``alpha``) * cross-entropy when the data
    has labels, distillation alone otherwise. SGD (momentum 0.9, Nesterov; default lr 0.01) or AdamW
    (default lr 1e-4), cosine schedule over all ``epochs``. ``freeze="rewritten"`` trains only the blocks
    the recipe rewrote. ``checkpoint``: written atomically after every epoch (model, optimizer, scheduler,
    epoch, step); ``resume=True`` continues from it, an existing one is replaced only with ``force``.
    ``max_steps`` stops early (the schedule still spans ``epochs``); ``num_images`` trains on a seeded
    subset. ``batch_size`` is per process. ``bf16`` runs the forward passes under bfloat16 autocast (about twice
    as fast on CPUs with AVX-512 BF16, and on GPUs). A NaN/inf loss raises SurgeryError and keeps the last checkpoint.
    ``history(result).finetune`` is a FinetuneReport; ``converted`` is untouched.
    """
    if optimizer not in OPTIMIZERS:
        raise SurgeryError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if freeze not in FREEZE:
        raise SurgeryError(f"unknown freeze {freeze!r}; choose one of {', '.join(FREEZE)}")
    if epochs < 1 or temperature <= 0 or not 0 <= alpha <= 1:
        raise SurgeryError("need epochs >= 1, temperature > 0 and 0 <= alpha <= 1")
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if resume and ckpt is None:
        raise SurgeryError("resume needs the checkpoint path of the run to continue")
    if ckpt is not None and ckpt.exists() and not resume and not force:
        raise SurgeryError(f"checkpoint {ckpt} already exists; resume from it (--resume) or pass --force to start over")
    if ckpt is not None:
        check_writable(ckpt, force=True)  # now, not after the first epoch
    prefixes = _trainable_prefixes(converted, freeze)

    rank, world, started_group = _distributed()
    try:
        if torch.cuda.is_available() and world > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        else:
            device = model_device(converted)
        student = copy.deepcopy(converted).to(device)
        teacher = original if model_device(original) == device else copy.deepcopy(original).to(device)
        for name, p in student.named_parameters():
            p.requires_grad_(_inside(name, prefixes))
        params = [p for p in student.parameters() if p.requires_grad]
        if not params:
            raise SurgeryError("nothing to train: the model has no trainable parameters")
        loader, sampler = _train_loader(data, rank=rank, world=world, batch_size=batch_size, num_images=num_images,
                                        preset=preset, transform=transform, seed=seed)
        lr = OPTIMIZERS[optimizer] if lr is None else lr
        if optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(loader)))
        start_epoch = step = 0
        identity = _run_identity(converted, data, optimizer=optimizer, lr=lr, freeze=freeze, num_images=num_images,
                                batch_size=batch_size, world_size=world, seed=seed, temperature=temperature, alpha=alpha)
        if resume:
            state = _load_checkpoint(ckpt, student, opt, sched, epochs, device, identity)
            start_epoch, step = state["epoch"], state["step"]
        net = student
        if world > 1:
            net = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)

        report = FinetuneReport(epochs, start_epoch, 0, 0, world, [], [], 0.0, 0.0, str(ckpt) if ckpt else None)
        cpu, wall = time.process_time(), time.perf_counter()
        with eval_mode(teacher):
            for epoch in range(start_epoch, epochs):
                if max_steps is not None and step >= max_steps:
                    break
                if sampler is not None:
                    sampler.set_epoch(epoch)
                _set_train_mode(student, prefixes)
                epoch_loss, epoch_steps, finished = 0.0, 0, True
                bar = tqdm(loader, desc=f"fine-tune epoch {epoch + 1}/{epochs}", disable=not progress or rank != 0)
                for batch in bar:
                    if max_steps is not None and step >= max_steps:
                        finished = False
                        break
                    images, labels = split_batch(batch)
                    images = images.to(device)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        with torch.no_grad():
                            teacher_logits = teacher(images)
                        logits = net(images)
                    logits, teacher_logits = logits.float(), teacher_logits.float()
                    kd = distillation_loss(logits, teacher_logits, temperature)
                    loss = kd if labels is None else alpha * kd + (1 - alpha) * F.cross_entropy(logits, labels.to(device))
                    # Every process learns if any loss is not finite, so all stop together.
                    seen = torch.stack([kd.detach(), loss.detach()]).float()
                    if world > 1:
                        dist.all_reduce(seen)
                        seen /= world
                    if not torch.isfinite(seen).all():
                        raise SurgeryError(_nan_message(float(seen[1]), epoch, step, ckpt, start_epoch + len(report.epoch_losses)))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    step += 1
                    epoch_steps += 1
                    epoch_loss += float(seen[0])
                    report.distill_losses.append(float(seen[0]))
                    report.steps += 1
                    report.images += len(images) * world
                    bar.set_postfix(distill=f"{float(seen[0]):.4f}")
                _sync_buffers(student, world)
                if not finished:
                    break
                report.epoch_losses.append(epoch_loss / max(1, epoch_steps))
                if ckpt is not None and rank == 0:
                    _save_checkpoint(ckpt, student, opt, sched, epoch=epoch + 1, step=step, epochs=epochs,
                                     losses=report.epoch_losses, identity=identity)
        report.cpu_seconds, report.wall_seconds = time.process_time() - cpu, time.perf_counter() - wall
        if world > 1:
            dist.barrier()  # the checkpoint is complete before any process returns
    finally:
        if started_group:
            dist.destroy_process_group()

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
