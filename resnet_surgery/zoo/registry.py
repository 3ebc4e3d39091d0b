"""Load models by name (torchvision, timm, the CIFAR-10 zoo) with weights from torchvision's enums or a file."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torchvision
from torch import nn

from ..errors import SurgeryError, first_line
from ..history import Source, history, record
from ..utils import freeze_batchnorms
from .cifar import CIFAR_MODELS, cifar_resnet, load_cifar_resnet
from .judge import JUDGE_NAME, build_judge, load_judge
from .weights import WEIGHT_FILE_SUFFIXES, check_cached_hash, file_sha256, load_state_into, read_state_dict

__all__ = [
    "DETECTION_MODELS", "FAMILIES", "FROZEN_BN_MODELS", "SEGMENTATION_MODELS", "TORCHVISION_MODELS",
    "DETECTION_CLASSES", "build_torchvision", "classifier_only", "exportable_part", "load_named", "load_timm", "load_torchvision", "load_zoo",
]

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


def _torchvision_weights(name: str, weights: str):
    enum = torchvision.models.get_model_weights(name)
    try:
        return enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except KeyError:
        choices = ", ".join(dict.fromkeys(["DEFAULT", *enum.__members__]))  # DEFAULT is an alias in the enum
        raise SurgeryError(f"{name} has no weights {weights!r}: choose one of {choices}, none, or a file path") from None


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
    check_cached_hash(cached)
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
    """A timm model: weights "none", "DEFAULT" (timm's own download) or a weights file."""
    try:
        import timm
    except ImportError:
        raise SurgeryError("timm models need timm: pip install 'resnet-surgery[timm]'") from None
    try:
        model = timm.create_model(name, pretrained=weights.upper() == "DEFAULT")
    except RuntimeError as e:
        raise SurgeryError(f"timm cannot create {name!r}: {first_line(e, 300)}") from None
    except OSError as e:
        raise SurgeryError(f"cannot download timm weights for {name} ({e}); pass --weights PATH") from None
    if Path(weights).suffix in WEIGHT_FILE_SUFFIXES:
        load_state_into(model, read_state_dict(weights), f"timm:{name}", weights)
    elif weights.lower() not in ("none", "default"):
        raise SurgeryError(f"timm weights must be none, DEFAULT or a file path, not {weights!r}")
    return model


def load_zoo(name: str, weights: str = "DEFAULT") -> nn.Module:
    """The project's CIFAR-10 models: DEFAULT is the committed trained weights, none a random init.

    Args:
        name: cifar10-resnet-v1, cifar10-resnet-v1.5 or cifar10-resnet50 (the trained ResNet-50 that recovery is
            judged by: see `zoo.judge`).
        weights: DEFAULT, none or a weights file.

    Returns:
        Module: the model; ``model.input_size`` is the image side it was trained at.
    """
    if name == JUDGE_NAME:
        return _load_judge_weights(weights)
    if name not in CIFAR_MODELS:
        raise SurgeryError(f"unknown model {name!r}: the CIFAR-10 models are {', '.join((*CIFAR_MODELS, JUDGE_NAME))}")
    if weights.upper() == "DEFAULT":
        return load_cifar_resnet(CIFAR_MODELS[name])
    model = cifar_resnet(CIFAR_MODELS[name])
    if Path(weights).suffix in WEIGHT_FILE_SUFFIXES:
        load_state_into(model, read_state_dict(weights), name, weights)
    elif weights.lower() != "none":
        raise SurgeryError(f"{name} weights must be DEFAULT, none or a file path, not {weights!r}")
    model.input_size = 32
    return model


def _load_judge_weights(weights: str) -> nn.Module:
    """cifar10-resnet50: DEFAULT is the checkout's (or RESNET_SURGERY_WEIGHTS') file, a path any file that
    benchmarks/train_resnet50.py wrote (its metadata names the architecture), none the stand-in at random."""
    if weights.upper() == "DEFAULT":
        return load_judge()
    if Path(weights).suffix == ".safetensors":
        return load_judge(weights)
    if weights.lower() == "none":
        model = build_judge()
        model.input_size = 64  # the stand-in's training size
        return model
    raise SurgeryError(f"{JUDGE_NAME} weights must be DEFAULT, none or a .safetensors file written by "
                       f"benchmarks/train_resnet50.py, not {weights!r}")


def _is_torchvision(spec: str) -> bool:
    # any other torchvision classifier loads too, for `inspect`'s verdict
    return (spec in TORCHVISION_MODELS or spec in DETECTION_MODELS or spec in SEGMENTATION_MODELS
            or spec in torchvision.models.list_models(module=torchvision.models))


# The model families by the names they answer to, tried in order: (kind, knows the name, builds it with weights).
FAMILIES = (
    ("timm", lambda spec: spec.startswith("timm:"), lambda spec, weights: load_timm(spec.removeprefix("timm:"), weights)),
    ("torchvision", _is_torchvision, load_torchvision),
    ("zoo", lambda spec: spec.startswith("cifar10-"), load_zoo),
)


def load_named(spec: str, weights: str = "none") -> nn.Module:
    """A model by name (folders: ``store.load_model``).

    Args:
        spec: a torchvision name, ``timm:NAME`` or a CIFAR-10 zoo name.
        weights: a torchvision enum name (DEFAULT, IMAGENET1K_V2...), "none" (random init) or a weights file.

    Returns:
        The model in eval mode, its source recorded in ``history(model).source``.
    """
    weights = str(weights)
    found = next(((kind, build) for kind, knows, build in FAMILIES if knows(spec)), None)
    if found is None:
        raise SurgeryError(f"unknown model {spec!r}: use one of {', '.join(TORCHVISION_MODELS)}, a detection or "
                           f"segmentation model ({', '.join(DETECTION_MODELS + SEGMENTATION_MODELS)}), timm:NAME, "
                           "cifar10-resnet-v1, cifar10-resnet-v1.5, cifar10-resnet50, or a folder written by "
                           "`resnet-surgery convert`")
    kind, build = found
    model = build(spec, weights).eval()
    if Path(weights).suffix in WEIGHT_FILE_SUFFIXES:  # a file: recorded so another folder finds the same one
        return record(model, source=Source(spec, kind, str(Path(weights).resolve()), file_sha256(weights)))
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
