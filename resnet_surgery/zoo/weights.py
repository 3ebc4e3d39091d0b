"""Weights files: read a state_dict safely (safetensors, or torch.load with weights_only=True) and load it."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import struct
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..errors import SurgeryError, first_line

__all__ = ["WEIGHT_FILE_SUFFIXES", "check_cached_hash", "file_sha256", "load_state_into", "non_finite",
           "read_state_dict", "torch_load"]

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".safetensors")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors`` or ``.pth``/``.pt`` (``weights_only=True``: never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise SurgeryError(f"{path} is not a readable safetensors file ({first_line(e)}); is it corrupt?") from None
    obj = torch_load(path)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SurgeryError(f"{path} is not a state_dict (a dict of tensors); save model.state_dict() instead")
    # Checkpoints saved from DistributedDataParallel prefix every key with "module.".
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def torch_load(path: Path, map_location="cpu"):
    """``torch.load(weights_only=True)`` with every way a file can be unreadable as one SurgeryError."""
    if path.stat().st_size == 0:
        raise SurgeryError(f"{path} is empty (0 bytes); pass the checkpoint file itself, re-saved if need be")
    if not zipfile.is_zipfile(path) and not _starts_like_pickle(path):
        with open(path, "rb") as f:
            head = f.read(16)
        raise SurgeryError(f"{path} is not a readable PyTorch checkpoint (neither the zip archive torch.save writes "
                           f"nor a pickle; it starts with {head!r}); pass a file written by torch.save, or .safetensors")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(path):  # and so starts like a pickle (checked above)
            raise SurgeryError(
                f"{path} is a plain pickle, which safe loading (weights_only=True) refuses because unpickling can "
                "run code; if you trust it, convert it once: torch.save(torch.load(PATH, weights_only=False), "
                "'weights.pt') with a state_dict inside (model.state_dict() for a whole model), or use .safetensors"
            ) from None
        if "Unsupported global" not in str(e) and "GLOBAL" not in str(e):
            raise SurgeryError(f"{path} is not a readable PyTorch checkpoint; is it corrupt or truncated?") from None
        raise SurgeryError(f"{path} holds pickled Python objects (a whole model?), not just tensors; "
                           "save model.state_dict() instead: resnet-surgery never unpickles code") from None
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, OSError, IndexError, TypeError,
            AttributeError, struct.error) as e:
        # A damaged file can fail anywhere in the unpickler, even with a bare opcode (KeyError: 101) or an
        # empty stack (IndexError: a zip header with one bit flipped reads as a legacy pickle; found by fuzzing).
        raise SurgeryError(f"{path} is not a readable PyTorch checkpoint ({first_line(e)}); is it corrupt, truncated "
                           "or not a checkpoint at all?") from None


def _starts_like_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"  # the PROTO opcode that starts every pickle since protocol 2


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], what: str, source: str) -> None:
    """``model.load_state_dict(state)``, with a one-line error naming missing, unexpected and misshapen keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(v.shape)}"
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes)):
            if items:
                more = f", ... {len(items) - 3} more" if len(items) > 3 else ""
                parts.append(f"{len(items)} {label} ({', '.join(items[:3])}{more})")
        raise SurgeryError(f"{source} does not fit {what}: {'; '.join(parts)}")
    if bad := non_finite(state):
        raise SurgeryError(f"{source} holds NaN or infinite values ({bad}); it is damaged: use the file it was made "
                           "from, or the run that wrote it again")
    model.load_state_dict(state)


def non_finite(state: dict[str, torch.Tensor]) -> str:
    """The names of the floating-point tensors of ``state`` that hold a NaN or an infinity ("" when none)."""
    names = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    return ", ".join(names[:3]) + (f", ... {len(names) - 3} more" if len(names) > 3 else "")


def check_cached_hash(path: Path) -> None:
    """torchvision's file names carry the first hex digits of their sha256: warn when a cached file differs."""
    match = re.search(r"-([0-9a-f]{8,})\.", path.name)
    if not match or not path.is_file():
        return
    if not file_sha256(path).startswith(match.group(1)):
        warnings.warn(f"{path} does not match the sha256 prefix in its name ({match.group(1)}): "
                      "it is not the file torchvision publishes", stacklevel=3)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's content, read in chunks.

    Args:
        path: the file.

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
