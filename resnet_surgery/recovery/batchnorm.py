"""BatchNorm re-estimation: new running statistics for the norms whose input an approximate rewrite changed,
as plain averages of batch statistics or matched to the original model's normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d
from tqdm import tqdm

from ..utils import eval_mode, model_device

__all__ = ["reestimate_bn"]


def _batchnorms(model: nn.Module, norms: Sequence[str]) -> dict[str, nn.Module]:
    layers = {n: model.get_submodule(n) for n in dict.fromkeys(norms)}
    return {n: m for n, m in layers.items() if isinstance(m, FrozenBatchNorm2d)
            or isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


def _average_batch_stats(bn: nn.Module, sums: list):
    """A forward hook that adds this batch's statistics to ``sums`` and normalises with them (training-mode
    BatchNorm), for a FrozenBatchNorm2d, which has no training mode."""

    def hook(_, args, output):
        x = args[0]
        mean, var = _channel_stats(x)
        sums[0], sums[1], sums[2] = sums[0] + mean, sums[1] + var, sums[2] + 1
        return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), bn.weight, bn.bias, False, 0.0, bn.eps)

    return hook


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance of an N x C x ... activation (what BatchNorm tracks)."""
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x.float(), dim=dims, correction=1)
    return mean, var


def reestimate_bn(model: nn.Module, norms: Sequence[str], batches, *, reference: nn.Module | None = None,
                  progress: bool = True) -> int:
    """Re-estimate the running statistics of the BatchNorm layers ``norms`` of ``model`` on ``batches``, with
    every other module in eval mode. Returns the images seen.

    Without ``reference``: reset them and recompute them as plain averages of batch statistics (momentum=None).
    A FrozenBatchNorm2d (torchvision's detection trunks) has no training mode: hooks average its batch statistics.
    With ``reference`` (the original model): match it. A norm that ``reference`` has too (same name and size)
    gets statistics that normalise ``model``'s new activations the way ``reference``'s running statistics
    normalise its own activations on the same images, matching mean and variance. That is plain re-estimation
    when the reference's statistics describe these images, and it keeps a norm whose input did not change as
    it was even when they do not (e.g. statistics gathered on augmented training images).

    Args:
        model: the model whose norms change (in place).
        norms: names of its BatchNorm layers; others (and norms without running statistics) are skipped.
        batches: (images, labels) batches.
        reference: the original model to match, or None for plain re-estimation.
        progress: show a progress bar.

    Returns:
        int: the images seen (0 when none of ``norms`` is a BatchNorm with running statistics).
    """
    layers = _batchnorms(model, norms)
    if not layers:
        return 0
    if reference is None:
        return _plain_bn(model, list(layers.values()), batches, progress)
    ref_layers = _batchnorms(reference, list(layers))
    ref_layers = {n: m for n, m in ref_layers.items() if m.running_mean.shape == layers[n].running_mean.shape}
    device = model_device(model)
    ref_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    sums = {n: [0.0, 0.0, 0] for n in layers}  # running sums of the new mean and variance, batch count
    handles = [m.register_forward_pre_hook(_record(ref_stats, n)) for n, m in ref_layers.items()]
    handles += [m.register_forward_hook(_renormalise(ref_layers.get(n), ref_stats, n, sums[n]))
                for n, m in layers.items()]
    images_seen = 0
    try:
        with eval_mode(model, reference), torch.no_grad():
            for images, _ in tqdm(batches, desc="BatchNorm re-estimation", disable=not progress, leave=False):
                images = images.to(device)
                ref_stats.clear()
                reference(images)
                model(images)
                images_seen += len(images)
    finally:
        for h in handles:
            h.remove()
    _write_stats(layers, sums)
    return images_seen


def _record(ref_stats: dict, name: str):
    """A forward pre-hook that keeps the reference norm's input statistics of this batch in ``ref_stats``."""

    def hook(_, args):
        ref_stats[name] = _channel_stats(args[0])

    return hook


def _renormalise(ref_bn: nn.Module | None, ref_stats: dict, name: str, sums: list):
    """A forward hook that adds this batch's statistics, matched to the reference norm ``ref_bn`` when it saw
    the batch, to ``sums`` and normalises with them."""

    def hook(bn, args, output):
        x = args[0]
        mean, var = _channel_stats(x)
        if name in ref_stats:
            # Same standardised distribution as the reference: (x - mean') / std' ~ (x_ref - mu) / sigma.
            ref_mean, ref_var = ref_stats[name]
            ref_running_mean, ref_running_var = ref_bn.running_mean, ref_bn.running_var
            var = ((ref_running_var + bn.eps) * (var + bn.eps) / (ref_var + bn.eps) - bn.eps).clamp_min(0)
            mean = mean - ((var + bn.eps) / (ref_running_var + bn.eps)).sqrt() * (ref_mean - ref_running_mean)
        sums[0], sums[1], sums[2] = sums[0] + mean, sums[1] + var, sums[2] + 1
        # Downstream layers of this pass see activations normalised with this batch's estimate.
        return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), bn.weight, bn.bias, False, 0.0, bn.eps)

    return hook


def _write_stats(layers: dict[str, nn.Module], sums: dict[str, list]) -> None:
    for name, m in layers.items():
        mean, var, count = sums[name]
        if count:
            m.running_mean.copy_(mean / count)
            m.running_var.copy_(var / count)
            if hasattr(m, "num_batches_tracked"):  # FrozenBatchNorm2d counts nothing
                m.num_batches_tracked.fill_(count)


def _plain_bn(model: nn.Module, layers: list[nn.Module], batches, progress: bool) -> int:
    device = model_device(model)
    frozen = {str(i): m for i, m in enumerate(layers) if isinstance(m, FrozenBatchNorm2d)}
    layers = [m for m in layers if not isinstance(m, FrozenBatchNorm2d)]
    momenta = [m.momentum for m in layers]
    sums = {n: [0.0, 0.0, 0] for n in frozen}
    handles = [m.register_forward_hook(_average_batch_stats(m, sums[n])) for n, m in frozen.items()]
    images_seen = 0
    with eval_mode(model), torch.no_grad():
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch counts the same
            m.train()
        try:
            for images, _ in tqdm(batches, desc="BatchNorm re-estimation", disable=not progress, leave=False):
                model(images.to(device))
                images_seen += len(images)
        finally:
            for m, momentum in zip(layers, momenta):
                m.momentum = momentum
            for h in handles:
                h.remove()
    _write_stats(frozen, sums)
    return images_seen

