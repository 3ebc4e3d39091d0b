"""Small helpers every part of the package shares: train/eval mode, devices, private copies, text tables."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import json
import math
import os
from collections.abc import Iterator

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .errors import SurgeryError, first_line

__all__ = [
    "MAX_SIDE", "check_argument", "check_model", "eval_mode", "freeze_batchnorms", "image_size", "json_text",
    "library_versions", "model_device", "model_runs_at", "private_copy", "report_dict", "state_digest", "table"]


def private_copy(model: nn.Module) -> nn.Module:
    """A deep copy in the same train/eval mode, module by module (deepcopy of a GraphModule loses it)."""
    new = copy.deepcopy(model)
    modes = {name: m.training for name, m in model.named_modules()}
    for name, m in new.named_modules():
        m.training = modes.get(name, m.training)
    return new


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode and give every submodule its own training flag back afterwards."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (CPU for a model without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def table(rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned text columns, the first row being the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def library_versions() -> dict[str, str]:
    """The installed versions of resnet-surgery and the libraries whose behaviour a result depends on."""
    versions = {}
    for pkg in ("resnet-surgery", "torch", "torchvision", "timm", "onnx", "onnxruntime"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def report_dict(report):
    """A step's report as plain data: its ``to_dict()``, or the value itself (None, a dict)."""
    if report is None:
        return None
    return report.to_dict() if hasattr(report, "to_dict") else report


MAX_SIDE = 65536  # an input side (or channel count) beyond any image a CNN is run on; torch's sizes overflow later


def image_size(input_size) -> tuple[int, int, int]:
    """One type for an input size everywhere: (C, H, W) as a tuple of ints.

    Args:
        input_size: an int N (a 3-channel N x N image) or a sequence (C, H, W) of positive ints.

    Returns:
        The size as ``(C, H, W)``; a TypeError names what was given otherwise.
    """
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        input_size = (3, input_size, input_size)
    if (not isinstance(input_size, (tuple, list)) or len(input_size) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_SIDE for v in input_size)):
        raise TypeError(f"input_size takes an int N or (C, H, W) of positive ints up to {MAX_SIDE}, got {input_size!r}")
    return tuple(input_size)


def check_argument(value, name: str, types, takes: str, hint: str = ""):
    """One clear error for a public function's argument of the wrong type, instead of an AttributeError deep inside.

    Args:
        value: the argument as given.
        name: the argument's name.
        types: the type (or tuple of types) it must be.
        takes: what it takes, in words.
        hint: what to do instead, appended to the error.

    Returns:
        ``value``; a TypeError naming the argument, what it takes and what it got otherwise.
    """
    if not isinstance(value, types):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise TypeError(f"{name} takes {takes}, got {type(value).__name__} {shown}{hint}")
    return value


def check_model(value, name: str = "model") -> nn.Module:
    """``value`` when it is a torch module; a TypeError naming ``name`` otherwise (a name or path says how to load it).

    Args:
        value: the argument as given.
        name: the argument's name.

    Returns:
        ``value``.
    """
    load = f"; load it first: resnet_surgery.load_model({str(value)!r})" if isinstance(value, (str, os.PathLike)) else ""
    return check_argument(value, name, nn.Module, "a torch nn.Module", load)


def freeze_batchnorms(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d of ``module`` replaced by a FrozenBatchNorm2d holding its statistics and affine parameters."""
    for name, m in list(module.named_modules()):
        if type(m) is nn.BatchNorm2d:
            frozen = FrozenBatchNorm2d(m.num_features, m.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(m, key).detach())
            module.set_submodule(name, frozen)
    return module


def state_digest(model: nn.Module) -> str:
    """A digest of ``model``'s weights: every state_dict key and the bytes of its tensor.

    Args:
        model: the module.

    Returns:
        The first 16 hex digits of the sha256.
    """
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def json_text(value) -> str:
    """``value`` as indented JSON text (a newline at the end) with every NaN or infinity written as null: a
    report never holds a number JSON cannot (a loss of a run that took no step, a ratio of nothing).

    Args:
        value: dicts, lists and scalars, nested; other objects are written as their str().

    Returns:
        The text.
    """
    def finite(v):
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(value), indent=2, default=str, allow_nan=False) + "\n"


@contextlib.contextmanager
def model_runs_at(input_size) -> Iterator[None]:
    """Inside, torch's shape errors (a channel count or a map size the model does not take) are one
    SurgeryError naming the size.

    Args:
        input_size: the (C, H, W) the model is run at.

    Raises:
        SurgeryError: the model raised RuntimeError at that size.
    """
    try:
        yield
    except RuntimeError as e:
        raise SurgeryError(f"the model does not run on a {'x'.join(map(str, input_size))} input ({first_line(e, 200)}); "
                           "pass the input size it takes") from None

