"""How image files become a model's input: the presets, the preprocessing a model's weights were published
with, and the one rule that picks between them (`preprocessing`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..arguments import checked_arguments
from ..errors import SurgeryError
from .cifar10 import CIFAR10_MEAN, CIFAR10_STD

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PRESETS", "build_transform", "model_transform", "preprocessing", "preset_transform", "transform_size"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Preprocessing presets: final size, resize before the centre crop (None: resize straight to size), mean, std.
PRESETS = {
    "imagenet": {"size": 224, "resize": 256, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "cifar10": {"size": 32, "resize": None, "mean": CIFAR10_MEAN, "std": CIFAR10_STD},
}


def build_transform(
    size: int | Sequence[int] = 224,
    resize: int | None = 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
):
    """PIL image -> normalised float tensor: resize (shorter side), centre crop ``size``, normalise.

    ``resize=None`` resizes straight to ``size`` (for images already about the right size, like CIFAR).
    """
    from torchvision import transforms as T

    if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
        raise SurgeryError(f"mean and std need three numbers (one per channel), std all positive; got mean {tuple(mean)} "
                           f"and std {tuple(std)}")
    steps = [T.Resize(resize), T.CenterCrop(size)] if resize else [T.Resize(size), T.CenterCrop(size)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def preset_transform(preset: str = "imagenet", **overrides):
    """The transform of a named preset ("imagenet" or "cifar10"), with any of size/resize/mean/std overridden."""
    if preset not in PRESETS:
        raise SurgeryError(f"unknown preprocessing preset {preset!r}; choose one of {', '.join(PRESETS)}")
    opts = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return build_transform(**opts)


@checked_arguments
def model_transform(model):
    """The preprocessing ``model``'s weights were published with, or None when it is not known: torchvision
    enum weights carry theirs (``weights.transforms()``: resize 232 for IMAGENET1K_V2), timm models their
    data config, the CIFAR-10 zoo the cifar10 preset. Random or file weights and custom models: None.

    Args:
        model: a model (its recorded source, ``history(model).source``, says where its weights came from).

    Returns:
        The transform (PIL image -> normalised tensor), or None.

    Raises:
        SurgeryError: the recorded source names torchvision weights this torchvision does not have (a
            recipe.json edited or written by another version).
    """
    from ..history import history

    source = history(model).source
    if source is None:
        return None
    if source.kind == "timm":
        import timm.data

        return timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    if source.kind == "zoo":  # the project's CIFAR-10 models were trained with it, at the side the zoo records
        return preset_transform("cifar10", size=getattr(model, "input_size", None))
    weights = source.weights or "none"
    if source.kind != "torchvision" or weights.lower() == "none" or Path(weights).suffix:
        return None  # random init or a local file: nothing says how its images were prepared
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(source.model)
        return (enum.DEFAULT if weights == "DEFAULT" else enum[weights]).transforms()
    except (KeyError, ValueError):
        raise SurgeryError(f"the model's recorded source names weights {weights!r} of torchvision's "
                           f"{source.model!r}, which this torchvision does not have; pass the preprocessing "
                           "(preset= or transform=, --preset on the command line)") from None


def preprocessing(model, preset: str | None = None, transform=None):
    """The one rule by which image files become a model's input, the same from Python and the command line:
    ``transform`` when given, else ``preset``'s, else the preprocessing ``model``'s weights were published
    with (`model_transform`), else the imagenet preset.

    Args:
        model: the model the images are for (its source says how its weights were trained), or None.
        preset: "imagenet" or "cifar10", or None.
        transform: a torchvision transform, or None.

    Returns:
        The transform.

    Raises:
        SurgeryError: an unknown ``preset`` (when no ``transform`` is given).
    """
    if transform is not None:
        return transform
    if preset is not None:
        return preset_transform(preset)
    return (model_transform(model) if model is not None else None) or preset_transform("imagenet")


def transform_size(transform) -> int | None:
    """The side of the images ``transform`` makes (its centre crop), or None when it does not say."""
    crop = getattr(transform, "crop_size", None)  # torchvision weights' ImageClassification
    if crop is None:
        from torchvision import transforms as T

        crops = [t for t in getattr(transform, "transforms", []) if isinstance(t, T.CenterCrop)]
        crop = crops[-1].size if crops else None
    if isinstance(crop, int):
        return crop
    return int(crop[0]) if crop else None
