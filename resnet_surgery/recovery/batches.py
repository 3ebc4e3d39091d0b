"""Calibration batches read once: a loader's (images, labels) kept in memory for the passes that follow."""

from __future__ import annotations

from ..data import split_batch

__all__ = ["CACHE_BYTES", "Batches"]

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
