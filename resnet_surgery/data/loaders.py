"""Images in, whatever form they come in: `as_loader` and `as_dataset` accept an ImageFolder path, a Dataset
or a DataLoader, with or without labels; `DataSpec` says how; seeded subsets and held-out splits."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..arguments import checked_arguments
from ..defaults import MAX_BATCH
from ..errors import SurgeryError
from .images import image_folder, without_bad_images
from .transforms import preset_transform

__all__ = ["DataSpec", "as_dataset", "as_loader", "disjoint_subsets", "held_out_split", "split_batch"]


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch from any loader -> (images, labels or None): accepts a tensor, or (images, labels, ...).

    Args:
        batch: a tensor of images, a list or tuple (images, labels, ...), or a dict with "image" (and "label").

    Returns:
        (images, labels); labels None when the batch has none.

    Raises:
        SurgeryError: a batch of another kind.
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], labels
    if isinstance(batch, dict) and "image" in batch:
        return batch["image"], batch.get("label")
    raise SurgeryError(f"cannot read images from a batch of type {type(batch).__name__}; yield tensors or (image, label)")


def _subset(dataset: Dataset, num_images: int | None, seed: int) -> Dataset:
    if num_images is None:
        return dataset
    n = len(dataset)
    if num_images <= 0:
        raise SurgeryError(f"num_images must be positive, got {num_images}")
    if num_images >= n:
        return dataset
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[:num_images].sort().values
    return Subset(dataset, idx.tolist())


@checked_arguments
def as_loader(
    data,
    *,
    preset: str = "imagenet",
    transform=None,
    batch_size: int = 64,
    num_images: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    skip_bad_images: bool = False,
    progress: bool = True,
) -> DataLoader:
    """A DataLoader over ``data``: an ImageFolder path (preprocessed with ``transform`` or ``preset``),
    a Dataset, or a DataLoader (both used as they are). Batches may be image tensors or (images, labels);
    read them with `split_batch`.

    Args:
        data: an ImageFolder or flat-folder path, a Dataset, a DataLoader, or a `DataSpec` (read as it says, then
            taken as a DataLoader).
        preset: the preprocessing preset of a path, "imagenet" or "cifar10" (unless ``transform`` is given).
        transform: the preprocessing of a path's images (None: the preset's).
        batch_size: images per batch (a DataLoader given keeps its own).
        num_images: a fixed seeded random subset of that many images (None: all of them).
        shuffle: shuffle the images every epoch.
        seed: the seed of the subset and of the shuffling.
        num_workers: DataLoader worker processes (0: load in this process).
        skip_bad_images: leave unreadable images of a path out (each image of the subset is then decoded
            once beforehand) and list them in the loader's ``skipped_images``; False: an error naming one.
        progress: show a progress bar while checking the images.

    Returns:
        DataLoader: the loader (``data`` itself when it is a DataLoader and ``num_images`` is None).

    Raises:
        SurgeryError: ``batch_size`` or ``num_images`` below 1, an unknown preset, or ``data`` that is no
            folder of images, Dataset or DataLoader, or holds no image.
        TypeError: an argument of the wrong type.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 1 <= batch_size <= MAX_BATCH:
        raise SurgeryError(f"batch_size (--batch-size) takes an integer from 1 to {MAX_BATCH}, got {batch_size!r}")
    if isinstance(data, DataSpec):  # read as the spec says; then used as a DataLoader given
        data = data.loader()
    if isinstance(data, DataLoader):
        if num_images is None:
            return data
        # Keep the loader's own collate function and batch size; only take the subset.
        return DataLoader(
            _subset(data.dataset, num_images, seed),
            batch_size=data.batch_size or batch_size,
            shuffle=shuffle,
            num_workers=num_workers,
            collate_fn=data.collate_fn,
            generator=torch.Generator().manual_seed(seed),
        )
    data = as_dataset(data, preset=preset, transform=transform, sized=False)
    subset, skipped = _subset(data, num_images, seed), []
    if skip_bad_images:
        subset, skipped = without_bad_images(subset, progress)
    loader = DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
    loader.skipped_images = skipped
    return loader


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The images a step reads and how: the parameter group that `evaluate`, `calibrate` and `finetune` share.

    Args:
        data: an ImageFolder or flat-folder path, a Dataset or a DataLoader (see `as_loader`).
        preset: the preprocessing preset of a path ("imagenet" or "cifar10"), unless ``transform`` is given.
        transform: the preprocessing of a path's images (None: the preset's).
        num_images: a seeded random subset of that many images (None: all of them).
        batch_size: images per batch (per process under torchrun).
        seed: the seed of the subset (and of whatever else the step draws at random).
        progress: show progress bars.
    """

    data: object
    preset: str = "imagenet"
    transform: object = None
    num_images: int | None = None
    batch_size: int = 64
    seed: int = 0
    progress: bool = True

    def loader(self) -> DataLoader:
        """The DataLoader over these images, in order (see `as_loader`).

        Returns:
            DataLoader: batches of ``batch_size`` over the seeded subset of ``data``.
        """
        return as_loader(self.data, preset=self.preset, transform=self.transform, batch_size=self.batch_size,
                         num_images=self.num_images, seed=self.seed)


def as_dataset(data, *, preset: str = "imagenet", transform=None, sized: bool = True) -> Dataset:
    """The Dataset behind ``data``: an ImageFolder or flat-folder path (preprocessed with ``transform`` or
    ``preset``), a Dataset, or a DataLoader's dataset; an empty one is an error. ``sized=False`` also
    accepts a Dataset without ``__len__`` (an IterableDataset); a DataSpec gives its loader's dataset."""
    if isinstance(data, DataSpec):
        data = data.loader()
    if isinstance(data, DataLoader):
        data = data.dataset
    elif isinstance(data, (str, os.PathLike)):
        data = image_folder(data, transform or preset_transform(preset))
    if not isinstance(data, Dataset) or (sized and not hasattr(data, "__len__")):
        sized_text = "a sized torch Dataset" if sized else "a torch Dataset"
        raise SurgeryError(
            f"data must be an ImageFolder directory, {sized_text} or a DataLoader, not {type(data).__name__}"
        )
    if hasattr(data, "__len__") and len(data) == 0:
        raise SurgeryError("the dataset is empty; pass data with at least one image")
    return data


def disjoint_subsets(dataset: Dataset, sizes: Sequence[int | None], seed: int = 0) -> list[Dataset]:
    """Seeded random subsets of ``dataset`` that share no image, of the given sizes (None: all the rest).

    Sizes larger than what is left are cut down to it; a subset that would be empty is an error.
    """
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    subsets, start = [], 0
    for size in sizes:
        stop = len(order) if size is None else min(len(order), start + size)
        if stop <= start:
            raise SurgeryError(
                f"the dataset has {len(dataset)} images, too few for disjoint subsets of {list(sizes)}; "
                "pass more images or ask for fewer"
            )
        subsets.append(Subset(dataset, sorted(order[start:stop])))
        start = stop
    return subsets


def held_out_split(data, held_out_data=None, *, keep: int | None, hold: int | None, preset: str = "imagenet",
                   transform=None, seed: int = 0, too_few: str = "the data has one image") -> tuple[Dataset, Dataset]:
    """Images to work on and disjoint held-out images to check the work on, both seeded.

    Args:
        data: the images to work on (anything ``as_dataset`` takes).
        held_out_data: separate held-out images; None holds part of ``data`` out.
        keep: how many images to work on (None: all that are left).
        hold: how many held-out images (None: all of ``held_out_data``; with it None, it must be a number).
        preset: the preprocessing preset of a path.
        transform: the preprocessing of a path's images (None: the preset's).
        seed: seed of the subsets.
        too_few: the error when ``data`` alone has fewer than two images.

    Returns:
        (images to work on, held-out images).
    """
    dataset = as_dataset(data, preset=preset, transform=transform)
    if held_out_data is not None:
        held = as_dataset(held_out_data, preset=preset, transform=transform)
        kept = dataset if keep is None else disjoint_subsets(dataset, [keep], seed)[0]
        return kept, held if hold is None else disjoint_subsets(held, [hold], seed)[0]
    if len(dataset) < 2:
        raise SurgeryError(too_few)
    # Hold images out first, so a small folder still leaves both sides some.
    held, kept = disjoint_subsets(dataset, [min(hold, len(dataset) // 2), keep], seed)
    return kept, held
