"""Load models by name (torchvision, timm, the CIFAR-10 zoo) with weights from torchvision's enums or a file."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch
import torchvision
from torch import nn

from ..errors import SurgeryError, first_line
from ..history import Source, history, record

TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                      "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2")
# Detection and segmentation models whose trunk is a ResNet: the tool rewrites the trunk inside the whole model.
DETECTION_MODELS = ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn",
                    "maskrcnn_resnet50_fpn_v2", "keypointrcnn_resnet50_fpn", "retinanet_resnet50_fpn",
                    "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn")
SEGMENTATION_MODELS = ("deeplabv3_resnet50", "deeplabv3_resnet101", "fcn_resnet50", "fcn_resnet101")
# torchvision builds these trunks with FrozenBatchNorm2d when trained weights are requested (its published
# checkpoints have no num_batches_tracked there): built so always, any checkpoint of them loads.
FROZEN_BN_MODELS = ("fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn",
                    "retinanet_resnet50_fpn", "fcos_resnet50_fpn")
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".safetensors")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors`` or ``.pth``/``.pt`` (``weights_only=True``: never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

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
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, OSError) as e:
        # A damaged file can fail anywhere in the unpickler, even with a bare opcode (KeyError: 101).
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
    model.load_state_dict(state)


def _torchvision_weights(name: str, weights: str):
    enum = torchvision.models.get_model_weights(name)
    try:
        return enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except KeyError:
        choices = ", ".join(dict.fromkeys(["DEFAULT", *enum.__members__]))  # DEFAULT is an alias in the enum
        raise SurgeryError(f"{name} has no weights {weights!r}: choose one of {choices}, none, or a file path") from None


def _check_cached_hash(path: Path) -> None:
    """torchvision's file names carry the first hex digits of their sha256: warn when a cached file differs."""
    match = re.search(r"-([0-9a-f]{8,})\.", path.name)
    if not match or not path.is_file():
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(match.group(1)):
        warnings.warn(f"{path} does not match the sha256 prefix in its name ({match.group(1)}): "
                      "it is not the file torchvision publishes", stacklevel=3)


def freeze_batchnorms(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d of ``module`` replaced by a FrozenBatchNorm2d holding its statistics and affine parameters."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, m in list(module.named_modules()):
        if type(m) is nn.BatchNorm2d:
            frozen = FrozenBatchNorm2d(m.num_features, m.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(m, key).detach())
            module.set_submodule(name, frozen)
    return module


def build_torchvision(name: str) -> nn.Module:
    """A torchvision model with random weights, built as torchvision builds it for its published weights
    (never downloading a backbone: ``weights_backbone=None``)."""
    if name in SEGMENTATION_MODELS:  # torchvision's published weights include the auxiliary classifier
        return torchvision.models.get_model(name, weights=None, weights_backbone=None, aux_loss=True)
    if name in DETECTION_MODELS:
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None)
        if name in FROZEN_BN_MODELS:
            freeze_batchnorms(model.backbone.body)
        return model
    return torchvision.models.get_model(name, weights=None)


def load_torchvision(name: str, weights: str = "none") -> nn.Module:
    """A torchvision model, weights through torchvision's own enums and TORCH_HOME cache (offline when cached)."""
    model = build_torchvision(name)
    if weights.lower() == "none":
        return model
    if Path(weights).suffix in WEIGHT_FILE_SUFFIXES:
        load_state_into(model, read_state_dict(weights), name, weights)
        return model
    w = _torchvision_weights(name, weights)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
    _check_cached_hash(cached)
    try:
        state = w.get_state_dict(progress=True, check_hash=True)
    except OSError as e:  # URLError and socket errors: no network and nothing cached
        raise SurgeryError(f"cannot download {w} ({e}); put the file at {cached} (TORCH_HOME) "
                           "or pass --weights PATH") from None
    except (RuntimeError, ValueError, EOFError, KeyError, pickle.UnpicklingError) as e:
        raise SurgeryError(f"the cached weights {cached} cannot be read ({first_line(e)}): delete that file so "
                           "torchvision downloads it again, or pass --weights PATH") from None
    load_state_into(model, state, name, str(cached))
    return model


def load_timm(name: str, weights: str = "none") -> nn.Module:
    try:
        import timm
    except ImportError:
        raise SurgeryError("timm models need timm: pip install 'resnet-surgery[timm]'") from None
    try:
        model = timm.create_model(name, pretrained=weights.upper() == "DEFAULT")
    except RuntimeError as e:
        raise SurgeryError(f"timm cannot create {name!r}: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise SurgeryError(f"cannot download timm weights for {name} ({e}); pass --weights PATH") from None
    if Path(weights).suffix in WEIGHT_FILE_SUFFIXES:
        load_state_into(model, read_state_dict(weights), f"timm:{name}", weights)
    elif weights.lower() not in ("none", "default"):
        raise SurgeryError(f"timm weights must be none, DEFAULT or a file path, not {weights!r}")
    return model


def load_zoo(name: str, weights: str = "DEFAULT") -> nn.Module:
    """The project's CIFAR-10 models: DEFAULT is the committed trained weights, none a random init."""
    from .cifar import CIFAR_MODELS, cifar_resnet, load_cifar_resnet

    if name not in CIFAR_MODELS:
        raise SurgeryError(f"unknown model {name!r}: the CIFAR-10 models are {', '.join(CIFAR_MODELS)}")
    if weights.upper() == "DEFAULT":
        return load_cifar_resnet(CIFAR_MODELS[name])
    model = cifar_resnet(CIFAR_MODELS[name])
    if Path(weights).suffix in WEIGHT_FILE_SUFFIXES:
        load_state_into(model, read_state_dict(weights), name, weights)
    elif weights.lower() != "none":
        raise SurgeryError(f"{name} weights must be DEFAULT, none or a file path, not {weights!r}")
    return model


def load_named(spec: str, weights: str = "none") -> nn.Module:
    """A model by torchvision name, ``timm:NAME`` or CIFAR-10 zoo name (folders: ``recipe.load_model``)."""
    weights = str(weights)
    if spec.startswith("timm:"):
        model, kind = load_timm(spec.removeprefix("timm:"), weights), "timm"
    elif (spec in TORCHVISION_MODELS or spec in DETECTION_MODELS or spec in SEGMENTATION_MODELS
          or spec in torchvision.models.list_models(module=torchvision.models)):
        model, kind = load_torchvision(spec, weights), "torchvision"  # others load for `inspect`'s verdict
    elif spec.startswith("cifar10-"):
        model, kind = load_zoo(spec, weights), "zoo"
    else:
        raise SurgeryError(f"unknown model {spec!r}: use one of {', '.join(TORCHVISION_MODELS)}, a detection or "
                           f"segmentation model ({', '.join(DETECTION_MODELS + SEGMENTATION_MODELS)}), timm:NAME, "
                           "cifar10-resnet-v1, cifar10-resnet-v1.5, or a folder written by `resnet-surgery convert`")
    model.eval()
    return record(model, source=Source(spec, kind, weights))


# The classes of torchvision's detection models: a list of images in, boxes per image out.
DETECTION_CLASSES = (torchvision.models.detection.generalized_rcnn.GeneralizedRCNN,
                     torchvision.models.detection.RetinaNet, torchvision.models.detection.FCOS)


def exportable_part(model: nn.Module, part: str | None = None) -> nn.Module:
    """What `export_onnx` can take of ``model``: the submodule ``part``, or the model itself; a whole torchvision
    detection model (a list of images in, boxes per image out) is refused, naming ``part="backbone"``.

    Args:
        model: the loaded model.
        part: a submodule name, e.g. "backbone" (a detection model's ResNet with its feature pyramid).

    Returns:
        The module to export.
    """
    if part:
        try:
            return model.get_submodule(part)
        except AttributeError:
            children = ", ".join(name for name, _ in model.named_children())
            raise SurgeryError(f"{type(model).__name__} has no submodule {part!r}; its parts are: {children}") from None
    if isinstance(model, DETECTION_CLASSES):
        raise SurgeryError(f"{type(model).__name__} takes a list of images and returns boxes per image, which this "
                           "export (one image tensor in, verified tensors out) does not cover: export its trunk with "
                           "--part backbone (the ResNet and its feature pyramid)")
    return model


def classifier_only(model: nn.Module) -> nn.Module | None:
    """``model`` when it is a classifier, None for a detection or segmentation model: the weights' transforms
    of those keep each image's own size (no batch), and the trunk they calibrate on takes a normalised batch
    (the imagenet preset's mean/std, as torchvision's detection transform uses).

    Args:
        model: a loaded model (its recorded source names it).

    Returns:
        ``model``, or None.
    """
    source = history(model).source
    return None if source is not None and source.model in DETECTION_MODELS + SEGMENTATION_MODELS else model
