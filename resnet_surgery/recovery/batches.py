"""Calibration batches read once: a loader's (images, labels) kept in memory for the passes that follow."""

from __future__ import annotations

import torch

from ..data import split_batch

__all__ = ["CACHE_BYTES", "Batches", "first_images", "select_batches"]

# Calibration images stay in memory up to this size, so the passes do not decode them again.
CACHE_BYTES = 1 << 30


class Batches:
    """Re-iterable (images, labels) batches of a loader, kept in memory (when under CACHE_BYTES) after the
    first pass so later passes neither decode again nor depend on the loader's shuffling.

    Args:
        loader: any iterable of batches that `split_batch` reads (a DataLoader).
        cache: keep the batches of the first pass in memory (when they fit).
    """

    def __init__(self, loader, cache: bool = True):
        self.loader = loader
        self.cached: list | None = None
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cached) if self.cached is not None else len(self.loader)

    def __iter__(self):
        if self.cached is not None:
            yield from self.cached
            return
        kept, size = ([] if self.cache else None), 0
        for batch in self.loader:
            images, labels = split_batch(batch)
            if kept is not None:
                size += images.numel() * images.element_size()
                if size <= CACHE_BYTES:
                    kept.append((images, labels))
                else:
                    kept = None  # too big to keep: later passes read the loader again
            yield images, labels
        self.cached = kept


def select_batches(batches, indices, batch_size: int) -> list:
    """The images (and labels) at ``indices`` (positions in the order ``batches`` yields them), re-batched.

    Args:
        batches: (images, labels) batches, labels possibly None.
        indices: positions to keep.
        batch_size: images per returned batch.

    Returns:
        list: (images, labels) batches; labels None unless every batch had them.
    """
    keep, images, labels, start = set(indices), [], [], 0
    for x, y in batches:
        rows = [i for i in range(len(x)) if start + i in keep]
        images.append(x[rows])
        labels.append(y[rows] if y is not None else None)
        start += len(x)
    images = torch.cat(images)
    labels = torch.cat(labels) if all(y is not None for y in labels) else None
    return [(images[i : i + batch_size], labels[i : i + batch_size] if labels is not None else None)
            for i in range(0, len(images), max(1, batch_size))]


def first_images(batches, limit: int) -> list:
    """The first ``limit`` images of ``batches`` (and their labels), as they come.

    Args:
        batches: (images, labels) batches, labels possibly None.
        limit: how many images.

    Returns:
        list: (images, labels) batches, the last one cut short.
    """
    kept, seen = [], 0
    for images, labels in batches:
        if seen >= limit:
            break
        take = min(len(images), limit - seen)
        kept.append((images[:take], labels[:take] if labels is not None else None))
        seen += take
    return kept
