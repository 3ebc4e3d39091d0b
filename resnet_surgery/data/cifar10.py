"""CIFAR-10 from ../shared/data: extracted once into a cache outside the package, read as uint8 tensors."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import torch

from ..arguments import checked_arguments
from ..atomic import atomic_dir, atomic_file
from ..errors import SurgeryError

__all__ = ["CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_SPLITS", "CIFAR10_STD", "cache_root", "cifar10_tensors", "extract_cifar10", "normalize_uint8"]

CIFAR10_SPLITS = ("train", "test")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_DONE = ".complete"


def cache_root(path: str | os.PathLike | None = None) -> Path:
    """The user's cache folder: ``path``, else $RESNET_SURGERY_CACHE, else $XDG_CACHE_HOME/resnet-surgery,
    else ~/.cache/resnet-surgery (where torch keeps its own: never inside the installed package)."""
    if path is None:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path = os.environ.get("RESNET_SURGERY_CACHE") or Path(base) / "resnet-surgery"
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cifar_tar(shared_dir: str | os.PathLike, split: str) -> Path:
    if split not in CIFAR10_SPLITS:
        raise SurgeryError(f"unknown CIFAR-10 split {split!r}; choose one of {', '.join(CIFAR10_SPLITS)}")
    tar = Path(shared_dir) / "cifar10" / f"{split}.tar"
    if not tar.is_file():
        raise SurgeryError(f"{tar} not found; pass the shared data folder that holds cifar10/{split}.tar")
    return tar


@checked_arguments
def extract_cifar10(shared_dir: str | os.PathLike, split: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Extract cifar10/<split>.tar once into the cache and return the ImageFolder root (<cache>/cifar10/<split>).

    A marker file is written after a complete extraction, so an interrupted one is redone.

    Args:
        shared_dir: the shared data folder that holds ``cifar10/<split>.tar``.
        split: "train" or "test".
        cache_dir: the cache folder (None: `cache_root`'s default, e.g. ~/.cache/resnet-surgery).

    Returns:
        Path: the ImageFolder root, ``<cache>/cifar10/<split>``.

    Raises:
        SurgeryError: an unknown split, or no ``cifar10/<split>.tar`` in ``shared_dir``.
        TypeError: an argument of the wrong type.
    """
    tar = _cifar_tar(shared_dir, split)
    out = cache_root(cache_dir) / "cifar10"
    root = out / split
    if (root / _DONE).is_file():
        return root
    out.mkdir(parents=True, exist_ok=True)
    with atomic_dir(root, force=True) as tmp:
        with tarfile.open(tar) as tf:
            tf.extractall(tmp, filter="data")
        # The tar holds <split>/<class>/NNNN.jpg: lift the classes up to the root.
        inner = tmp / split
        for d in inner.iterdir():
            d.rename(tmp / d.name)
        inner.rmdir()
        (tmp / _DONE).write_text(str(tar))
    return root


def _rgb_mode():
    from torchvision.io import ImageReadMode

    return ImageReadMode.RGB


@checked_arguments
def cifar10_tensors(
    shared_dir: str | os.PathLike, split: str, cache_dir: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All CIFAR-10 images of ``split`` as (uint8 N x 3 x 32 x 32, int64 labels), decoded once and cached.

    Labels are ImageFolder's indices (classes sorted alphabetically); images are in tar order.

    Args:
        shared_dir: the shared data folder that holds ``cifar10/<split>.tar``.
        split: "train" or "test".
        cache_dir: the cache folder (None: `cache_root`'s default, e.g. ~/.cache/resnet-surgery).

    Returns:
        (uint8 images N x 3 x 32 x 32, int64 labels N).

    Raises:
        SurgeryError: an unknown split, no ``cifar10/<split>.tar`` in ``shared_dir``, or no images in it.
        TypeError: an argument of the wrong type.
    """
    from torchvision.io import decode_jpeg

    tar = _cifar_tar(shared_dir, split)
    cached = cache_root(cache_dir) / f"cifar10_{split}_uint8.pt"
    if cached.is_file():
        d = torch.load(cached, weights_only=True)
        return d["images"], d["labels"]
    datas, labels = [], []
    with tarfile.open(tar) as tf:
        for member in sorted((m for m in tf.getmembers() if m.isfile()), key=lambda m: m.name):
            cls = Path(member.name).parent.name
            if Path(member.name).suffix.lower() not in (".jpg", ".jpeg") or cls not in CIFAR10_CLASSES:
                continue
            datas.append(torch.frombuffer(bytearray(tf.extractfile(member).read()), dtype=torch.uint8))
            labels.append(CIFAR10_CLASSES.index(cls))
    if not datas:
        raise SurgeryError(f"{tar} holds no <class>/*.jpg images")
    images = torch.stack([decode_jpeg(d, mode=_rgb_mode()) for d in datas])
    labels = torch.tensor(labels, dtype=torch.int64)
    with atomic_file(cached, force=True) as tmp:
        torch.save({"images": images, "labels": labels}, tmp)
    return images, labels


def normalize_uint8(images: torch.Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> torch.Tensor:
    """uint8 N x 3 x H x W -> normalised float32 (the tensor path's equivalent of the cifar10 preset)."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (images.float() / 255 - m) / s
