"""Fine-tuning checkpoints: written atomically after every pass, resumed only by the run they belong to
(the model's fingerprint, the data and the options that shape the run)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..atomic import atomic_file
from ..errors import SurgeryError, first_line
from ..history import history
from ..zoo import non_finite, torch_load

__all__ = ["load_checkpoint", "run_identity", "save_checkpoint"]


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


def run_identity(model: nn.Module, data, **options) -> dict:
    """What a checkpoint belongs to: the model's fingerprint, the data and the options that shape the run.

    Args:
        model: the converted model the run starts from.
        data: the run's data (a path, a Dataset or a DataLoader).
        **options: the options that shape the run (objective, lr, seed...).

    Returns:
        dict: what `load_checkpoint` compares with the checkpoint's own.
    """
    return {"model": _model_fingerprint(model), "data": _data_identity(data), **options}


def _check_identity(path: Path, saved: dict | None, identity: dict | None) -> None:
    if identity is None:
        return
    if saved is None:
        raise SurgeryError(f"{path} does not record which model and options it belongs to (an older checkpoint); "
                           "start fresh with --force (force=True)")
    for key, value in identity.items():
        if saved.get(key) != value:
            what = {"model": "a different model (its modules, conv geometry or rewrites differ)",
                    "teacher": "a different teacher (the original's weights differ)"}.get(
                key, f"{key} {saved.get(key)!r}, not {value!r}")
            raise SurgeryError(f"{path} belongs to another run: {what}; resume with the same model, data and "
                               "options, or start fresh with --force (force=True)")


def save_checkpoint(path: Path, model, optimizer, scheduler, *, epoch, step, epochs, losses, identity=None) -> None:
    """Write a checkpoint atomically (a crash leaves the previous one).

    Args:
        path: the checkpoint file.
        model: the student.
        optimizer: its optimizer.
        scheduler: its learning-rate schedule.
        epoch: passes finished.
        step: optimizer steps taken.
        epochs: passes the run spans.
        losses: the mean loss of each finished pass.
        identity: the run's `run_identity`.
    """
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "epoch": epoch, "step": step, "epochs": epochs, "epoch_losses": losses, "identity": identity}
    with atomic_file(path, force=True) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, model, optimizer, scheduler, epochs: int, device, identity=None, lr=None) -> dict:
    """Load a checkpoint into the student, its optimizer and schedule, once it is shown to belong to this run.

    Args:
        path: the checkpoint file.
        model: the student (loaded in place).
        optimizer: its optimizer (loaded in place).
        scheduler: its learning-rate schedule (loaded in place).
        epochs: passes the run spans; the checkpoint's must match.
        device: where the tensors go.
        identity: the run's `run_identity` (None: not checked).
        lr: the learning rate to continue with (None: the checkpoint's); a lower one after a divergence scales
            the rest of the schedule.

    Returns:
        dict: the checkpoint (its "epoch" and "step" say where to continue).
    """
    if not path.is_file():
        raise SurgeryError(f"no checkpoint at {path} to resume from; run without resume to start fresh")
    state = torch_load(path, map_location=device)
    if not isinstance(state, dict):
        raise SurgeryError(f"{path} is not a fine-tuning checkpoint; pass the right checkpoint or start fresh with "
                           "--force (force=True)")
    _check_identity(path, state.get("identity"), identity)
    _check_values(path, state)
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise SurgeryError(f"{path} is not a fine-tuning checkpoint of this model ({first_line(e)}); "
                           "pass the right checkpoint or start fresh with --force (force=True)") from None
    if state["epochs"] != epochs:
        raise SurgeryError(f"{path} belongs to a run of {state['epochs']} epochs; resume with epochs={state['epochs']}")
    if lr is not None:
        _rescale_lr(optimizer, scheduler, lr)
    return state


def _check_values(path: Path, state: dict) -> None:
    """The checkpoint's counters are whole numbers in range and its weights finite (a damaged or edited file
    would otherwise resume at a nonsensical point, or from NaN)."""
    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62

    epochs, epoch, step = state.get("epochs"), state.get("epoch"), state.get("step")
    if not (count(epochs) and count(epoch) and count(step) and epoch <= epochs):
        raise SurgeryError(f"{path} holds counters out of range (epoch {epoch!r:.20} of {epochs!r:.20}, step "
                           f"{step!r:.20}); start fresh with --force (force=True)")
    weights = state.get("model")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise SurgeryError(f"{path} holds no model weights (a dict of tensors); start fresh with --force (force=True)")
    if bad := non_finite(weights):
        raise SurgeryError(f"{path} holds non-finite weights ({bad}); start fresh with --force (force=True)")


def _rescale_lr(optimizer, scheduler, lr: float) -> None:
    """Continue the saved schedule at ``lr`` instead of its own peak: every learning rate scales alike."""
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        # the point the cosine had reached, at the new peak (a NaN peak restarts at lr)
        group["lr"] = group["lr"] * lr / base if base > 0 else lr
        group["initial_lr"] = lr
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr reports

