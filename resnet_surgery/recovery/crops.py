"""Reconstruction on crops: a block whose maps are wider than RECONSTRUCT_CROP trains on stride-aligned crops of
its cached inputs, with the loss on the output pixels the crop's zero padding cannot reach."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

__all__ = ["CROP_MARGIN", "RECONSTRUCT_CROP", "Crop", "crop_plan"]

# Maps wider than this (ResNet-50's 56x56 at 224 px; not the CIFAR models' 32x32) are trained on stride-aligned
# crops of this side, about 3x cheaper a step; the loss leaves out CROP_MARGIN output pixels at each border (plus
# one per following block), which the crop's zero padding reaches. Held-back errors are always on whole maps.
RECONSTRUCT_CROP = 32
CROP_MARGIN = 2


@dataclasses.dataclass(frozen=True)
class Crop:
    """Train on crops: ``side`` input pixels at offsets that are multiples of ``stride`` (input side / output
    side); the loss skips ``margin`` output pixels at each border."""

    side: int
    stride: int
    margin: int

    def draw(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A random crop of the input batch and the target pixels its interior yields."""
        (h, w), s, m = x.shape[-2:], self.stride, self.margin
        top, left = (int(torch.randint(0, (n - self.side) // s + 1, (), generator=generator)) * s for n in (h, w))
        out = self.side // s
        return (x[..., top : top + self.side, left : left + self.side],
                y[..., top // s + m : top // s + out - m, left // s + m : left // s + out - m])

    def interior(self, out: torch.Tensor) -> torch.Tensor:
        return out[..., self.margin : out.shape[-2] - self.margin, self.margin : out.shape[-1] - self.margin]


def crop_plan(unit: nn.Module, x: torch.Tensor, y: torch.Tensor, margin: int, device) -> Crop | None:
    """How ``unit`` can be trained on crops of its cached inputs ``x`` (targets ``y``), or None: maps no wider
    than RECONSTRUCT_CROP, an output that is not the input shrunk by a whole stride, or a probe on which the
    crop's interior differs from the same pixels of the whole map (an op that reads the whole map)."""
    if x.dim() != 4 or y.dim() != 4 or min(x.shape[-2:]) <= RECONSTRUCT_CROP:
        return None
    stride = x.shape[-1] // y.shape[-1]
    if stride < 1 or tuple(y.shape[-2:]) != (x.shape[-2] // stride, x.shape[-1] // stride) or x.shape[-1] % stride:
        return None
    crop = Crop(RECONSTRUCT_CROP - RECONSTRUCT_CROP % stride, stride, margin)
    if crop.side // stride <= 2 * margin:
        return None
    probe = x[:2].to(device)
    with torch.no_grad():
        whole = unit(probe).float()
        part, target = crop.draw(probe, whole, torch.Generator().manual_seed(0))
        try:
            part = crop.interior(unit(part).float())
        except RuntimeError:  # a layer that takes one map size only
            return None
    scale = float(target.abs().max()) or 1.0
    return crop if part.shape == target.shape and float((part - target).abs().max()) <= 1e-4 * scale else None
