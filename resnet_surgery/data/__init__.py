"""Images in: CIFAR-10 from ../shared/data (`cifar10`), how image files become a model's input (`transforms`),
reading image files and folders (`images`), and one `as_loader` that accepts an ImageFolder directory, a
Dataset or a DataLoader, with or without labels (`loaders`). Code outside this package imports from here."""

from .cifar10 import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_SPLITS,
    CIFAR10_STD,
    cache_root,
    cifar10_tensors,
    extract_cifar10,
    normalize_uint8,
)
from .images import IMAGE_SUFFIXES, BadImageError, ImageFiles, image_folder, read_image, without_bad_images
from .loaders import DataSpec, as_dataset, as_loader, disjoint_subsets, held_out_split, split_batch
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    build_transform,
    model_transform,
    preprocessing,
    preset_transform,
    transform_size,
)

__all__ = [
    "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_SPLITS", "CIFAR10_STD", "IMAGENET_MEAN", "IMAGENET_STD",
    "IMAGE_SUFFIXES", "PRESETS", "BadImageError", "DataSpec", "ImageFiles", "as_dataset", "as_loader",
    "build_transform", "cache_root", "cifar10_tensors", "disjoint_subsets", "extract_cifar10", "held_out_split",
    "image_folder", "model_transform", "normalize_uint8", "preprocessing", "preset_transform", "read_image",
    "split_batch", "transform_size", "without_bad_images",
]
