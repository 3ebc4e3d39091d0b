"""Image files: reading one (a clear error for one that cannot be decoded), a flat folder or an ImageFolder
of them, and leaving the unreadable ones out on request."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from ..errors import SurgeryError, first_line

__all__ = ["BadImageError", "IMAGE_SUFFIXES", "ImageFiles", "image_folder", "read_image", "without_bad_images"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


class BadImageError(SurgeryError):
    """An image file that cannot be decoded; ``.path`` names it."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"cannot read image {path} ({reason}); delete or replace it, or pass --skip-bad-images "
                         "(skip_bad_images=True) to leave unreadable images out")
        self.path = str(path)


def read_image(path: str | os.PathLike):
    """torchvision's image loader (what ImageFolder uses), with an unreadable file as one BadImageError."""
    from PIL import UnidentifiedImageError
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image format PIL can read") from None
    except Exception as e:  # PIL raises many types for corrupt files (OSError, SyntaxError, ValueError, ...)
        raise BadImageError(path, first_line(e)) from None


class ImageFiles(Dataset):
    """The images of one flat folder, sorted by name, without labels (e.g. unlabelled calibration images)."""

    def __init__(self, files: Sequence[Path], transform):
        self.files, self.transform = list(files), transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(read_image(self.files[index]))


def without_bad_images(dataset: Dataset, progress: bool = True) -> tuple[Dataset, list[str]]:
    """``dataset`` less the items whose image cannot be read (each is decoded once to find out), and their paths."""
    from tqdm import tqdm

    good, bad = [], []
    for i in tqdm(range(len(dataset)), desc="checking images", disable=not progress, leave=False):
        try:
            dataset[i]
        except BadImageError as e:
            bad.append(e.path)
        else:
            good.append(i)
    if not good:
        raise SurgeryError(f"none of the {len(bad)} images can be read (first: {bad[0]}); check the data folder")
    return (dataset if not bad else Subset(dataset, good)), bad


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def image_folder(path: str | os.PathLike, transform) -> Dataset:
    """torchvision ImageFolder (<root>/<class>/<image>, with labels), or a flat folder of images (no labels),
    with a clear error for a missing or empty folder."""
    from torchvision.datasets import ImageFolder

    path = Path(path)
    try:
        found = path.is_dir()
    except OSError as e:  # a name too long, a loop of links: not a folder to read either
        raise SurgeryError(f"data folder {str(path)[:200]} cannot be read ({e.strerror})") from None
    if not found:
        raise SurgeryError(f"data folder {str(path)[:200]} not found; pass a folder of images or an ImageFolder "
                           "(<root>/<class>/<image>)")
    flat = sorted(p for p in path.iterdir() if _is_image(p))
    if flat:
        return ImageFiles(flat, transform)
    try:
        return ImageFolder(str(path), transform=transform, loader=read_image)
    except (FileNotFoundError, RuntimeError) as e:
        # ImageFolder raises for no class folders or no images in them.
        raise SurgeryError(
            f"data folder {path} holds no images, neither directly nor in class sub-folders "
            f"(<root>/<class>/<image>{'|'.join(IMAGE_SUFFIXES)})"
        ) from e
