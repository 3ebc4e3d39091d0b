"""The trained ResNet-50 that recovery is judged by: ``cifar10-resnet50``, trained on CIFAR-10 upsampled.

It does not ship with the package (it is the repository's, like its benchmarks): the file is
``weights/cifar10-resnet50.safetensors`` of a checkout, or the one ``RESNET_SURGERY_WEIGHTS`` (a folder)
holds. ``benchmarks/train_resnet50.py`` writes it: torchvision's unmodified ``resnet50`` with a 10-class head
when a GPU trained it, or the CPU stand-in (ResNet-50's depth, layout and module names at a quarter of the
width, on 64 px inputs). The file's metadata says which, and at what input size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import SurgeryError, first_line

__all__ = ["JUDGE_ARCHS", "JUDGE_FILE", "JUDGE_NAME", "STANDIN", "build_judge", "judge_info", "judge_path",
           "load_judge"]

JUDGE_NAME = "cifar10-resnet50"
JUDGE_FILE = Path(__file__).resolve().parents[2] / "weights" / f"{JUDGE_NAME}.safetensors"
JUDGE_ARCHS = ("standin", "resnet50")
# The CPU stand-in: ResNet-50's blocks per stage at a quarter of its widths, torchvision's ImageNet stem.
STANDIN = {"widths": [16, 32, 64, 128], "blocks": [3, 4, 6, 3], "stem_width": 16}


def build_judge(arch: str = "standin", meta: dict | None = None) -> nn.Module:
    """The judge's architecture with random weights.

    Args:
        arch: "resnet50" (torchvision's, 10 classes) or "standin" (see the module's docstring).
        meta: a weights file's metadata, whose widths and blocks (when present) build the stand-in.

    Returns:
        Module: the model, in train mode.
    """
    if arch == "resnet50":
        import torchvision

        return torchvision.models.resnet50(weights=None, num_classes=10)
    if arch != "standin":
        raise SurgeryError(f"unknown {JUDGE_NAME} architecture {arch!r}; choose one of {', '.join(JUDGE_ARCHS)}")
    from .cifar import cifar_resnet

    meta = meta or {}
    try:
        widths = json.loads(meta.get("widths", json.dumps(STANDIN["widths"])))
        blocks = json.loads(meta.get("blocks", json.dumps(STANDIN["blocks"])))
    except ValueError:
        raise SurgeryError("the weights file's metadata has unreadable widths or blocks; retrain it with "
                           "benchmarks/train_resnet50.py") from None
    return cifar_resnet("v1.5", widths=widths, blocks=blocks, stem_width=STANDIN["stem_width"], stem="imagenet")


def judge_path() -> Path:
    """Where the judge's weights are looked for: ``$RESNET_SURGERY_WEIGHTS/cifar10-resnet50.safetensors`` when
    that variable is set, else the checkout's ``weights/`` folder."""
    folder = os.environ.get("RESNET_SURGERY_WEIGHTS")
    return Path(folder) / JUDGE_FILE.name if folder else JUDGE_FILE


def judge_info(path: str | os.PathLike | None = None) -> dict:
    """The metadata of the judge's weights file (arch, input_size, cifar10_test_top1, epochs...).

    Args:
        path: the file (None: `judge_path()`).

    Returns:
        dict: its metadata, strings.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path) if path else judge_path()
    if not path.is_file():
        raise SurgeryError(f"{path} is missing: train it with `python benchmarks/train_resnet50.py` (or set "
                           "RESNET_SURGERY_WEIGHTS to the folder that holds cifar10-resnet50.safetensors)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise SurgeryError(f"{path} is not a readable safetensors file ({first_line(e)}); is it corrupt?") from None


def load_judge(path: str | os.PathLike | None = None) -> nn.Module:
    """The trained judge in float32 and eval mode, its architecture read from the file's metadata.

    Args:
        path: the weights file (None: `judge_path()`).

    Returns:
        Module: the model; ``judge_info(path)["input_size"]`` is the side it was trained at.
    """
    from .weights import load_state_into, read_state_dict

    path = Path(path) if path else judge_path()
    meta = judge_info(path)
    model = build_judge(meta.get("arch", "standin"), meta)
    state = {k: v.float() if v.is_floating_point() else v for k, v in read_state_dict(path).items()}
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise SurgeryError(f"{path} holds non-finite weights; retrain it with benchmarks/train_resnet50.py")
    load_state_into(model, state, JUDGE_NAME, str(path))
    try:
        model.input_size = int(meta.get("input_size", 64))  # the side it was trained at: its transform's size
    except ValueError:
        raise SurgeryError(f"{path} has an unreadable input_size in its metadata; retrain it with "
                           "benchmarks/train_resnet50.py") from None
    return model.eval()
