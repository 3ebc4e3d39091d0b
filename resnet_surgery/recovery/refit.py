"""Least-squares refit: each rewritten conv solved (ridge least squares on its unfolded input patches) so
that it reproduces the original conv's output on the calibration images."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..errors import SurgeryError
from ..utils import eval_mode, model_device
from .activations import capture, execution_order, named_module

__all__ = ["MAX_ROWS_PER_BATCH", "UNFOLD_BYTES", "ConvFit", "transfer_weights"]

# Unfolded conv inputs are processed in chunks of about this size, and at most this many rows (output
# positions) per batch enter the least-squares sums: enough for a well-posed fit, bounded memory.
UNFOLD_BYTES = 256 << 20
MAX_ROWS_PER_BATCH = 16384


@dataclasses.dataclass
class ConvFit:
    """The least-squares refit of one converted conv to the original conv's output.

    Args:
        conv: the converted model's conv.
        target: the original model's conv it reproduces.
        rows: output positions that entered the fit.
        unknowns: weights per output channel (and group) the fit solves for.
        error_before: squared error relative to the target's variance, with the weights before the fit.
        error_after: the same with the fitted weights.
    """

    conv: str
    target: str
    rows: int  # output positions that entered the fit
    unknowns: int  # weights per output channel (and group) the fit solves for
    error_before: float  # squared error relative to the target's variance, with the weights before the fit
    error_after: float



def _pad_for(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """F.pad amounts (left, right, top, bottom) equivalent to the conv's own padding."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        pads = []
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


class _LeastSquares:
    """Sums X^T X and X^T Y (float64) for refitting a conv: X = the conv's unfolded input patches,
    Y = the target outputs at the same positions, one block per group of a grouped conv."""

    def __init__(self, conv: nn.Conv2d, seed: int = 0):
        self.conv = conv
        self.g = conv.groups
        self.cin = conv.in_channels // self.g
        self.cout = conv.out_channels // self.g
        kh, kw = conv.kernel_size
        self.d = self.cin * kh * kw + (conv.bias is not None)  # a ones column carries the bias
        dev = conv.weight.device
        self.xtx = torch.zeros(self.g, self.d, self.d, dtype=torch.float64, device=dev)
        self.xty = torch.zeros(self.g, self.d, self.cout, dtype=torch.float64, device=dev)
        self.yty = torch.zeros(self.g, self.cout, dtype=torch.float64, device=dev)
        self.ysum = torch.zeros(self.g, self.cout, dtype=torch.float64, device=dev)
        self.rows = 0
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        conv = self.conv
        x = F.pad(x, _pad_for(conv), mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
        n = len(x)
        positions = y.shape[-2] * y.shape[-1]
        # Sample the same output positions for every image of the batch when there are too many rows.
        keep = None
        if n * positions > MAX_ROWS_PER_BATCH:
            count = max(1, MAX_ROWS_PER_BATCH // n)
            keep = torch.randperm(positions, generator=self.generator)[:count].to(x.device)
        y = y.flatten(2)
        chunk = max(1, UNFOLD_BYTES // (x[0].numel() * conv.kernel_size[0] * conv.kernel_size[1] * 4))
        for i in range(0, n, chunk):
            cols = F.unfold(x[i : i + chunk], conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
            if cols.shape[-1] != positions:
                raise SurgeryError(
                    f"the converted conv yields {cols.shape[-1]} positions but its target yields {positions}; "
                    "the recipe's conv pairs must have the same output shape"
                )
            target = y[i : i + chunk]
            if keep is not None:
                cols, target = cols[..., keep], target[..., keep]
            rows = cols.shape[0] * cols.shape[-1]
            # (images, g*d, L) -> (g, rows, d); (images, g*cout, L) -> (g, rows, cout)
            X = cols.transpose(1, 2).reshape(rows, self.g, -1).transpose(0, 1).float()
            if conv.bias is not None:
                X = torch.cat([X, X.new_ones(self.g, rows, 1)], dim=2)
            Y = target.transpose(1, 2).reshape(rows, self.g, self.cout).transpose(0, 1).float()
            # float32 products per chunk (fast), float64 sums across chunks (accurate).
            Xt = X.transpose(1, 2)
            self.xtx += (Xt @ X).double()
            self.xty += (Xt @ Y).double()
            self.yty += (Y * Y).sum(1).double()
            self.ysum += Y.sum(1).double()
            self.rows += rows

    def _weights(self) -> torch.Tensor:
        """The conv's current parameters as (g, d, cout)."""
        w = self.conv.weight.detach().double().reshape(self.g, self.cout, -1).transpose(1, 2)
        if self.conv.bias is not None:
            w = torch.cat([w, self.conv.bias.detach().double().reshape(self.g, 1, self.cout)], dim=1)
        return w

    def _relative_error(self, w: torch.Tensor) -> float:
        # ||XW - Y||^2 = tr(W^T X^T X W) - 2 tr(W^T X^T Y) + tr(Y^T Y), over the target's total variance.
        err = (w * (self.xtx @ w)).sum() - 2 * (w * self.xty).sum() + self.yty.sum()
        var = self.yty.sum() - (self.ysum**2).sum() / self.rows
        return float(err / var.clamp_min(1e-30))

    def solve(self, ridge: float) -> tuple[float, float]:
        """Set the conv's weights (and bias) to the ridge least-squares fit; returns the relative errors
        before and after."""
        if self.rows == 0:
            raise SurgeryError("no calibration images reached the conv; pass data with at least one image")
        before = self._relative_error(self._weights())
        a = self.xtx.clone()
        k = self.d - (self.conv.bias is not None)  # the bias column is not shrunk
        diag = a.diagonal(dim1=1, dim2=2)
        # The ridge is relative to the mean input energy, so one value suits every layer.
        scale = diag[:, :k].mean(dim=1, keepdim=True).clamp_min(1e-12)
        diag[:, :k] += ridge * scale
        try:
            w = torch.linalg.solve(a, self.xty)
        except torch.linalg.LinAlgError:
            raise SurgeryError(
                f"the calibration inputs of a conv are degenerate (singular covariance); use ridge > 0 "
                f"(now {ridge}) or more calibration images"
            ) from None
        after = self._relative_error(w)
        conv = self.conv
        with torch.no_grad():
            conv.weight.copy_(w[:, : k, :].transpose(1, 2).reshape(conv.weight.shape).to(conv.weight.dtype))
            if conv.bias is not None:
                conv.bias.copy_(w[:, k, :].reshape(-1).to(conv.bias.dtype))
        return before, after


def transfer_weights(
    model: nn.Module,
    original: nn.Module,
    convs: dict[str, str],
    batches,
    *,
    ridge: float = 1e-3,
    progress: bool = True,
) -> list[ConvFit]:
    """Refit each conv ``name`` of ``model`` in ``convs`` {name: original_name} so that, on the inputs it now
    receives, its output matches ``original``'s conv ``original_name`` (before its norm) by ridge least
    squares. Convs are fitted in forward order, each on the activations left by the fits before it.

    Args:
        model: the converted model (its convs change in place).
        original: the original model.
        convs: {conv of ``model``: conv of ``original`` whose output it reproduces}.
        batches: re-iterable (images, labels) batches (one pass per conv).
        ridge: the ridge, relative to the mean input energy of each conv.
        progress: show progress bars.

    Returns:
        list: a ConvFit per conv, in forward order.
    """
    device = model_device(model)
    for name, target in convs.items():
        named_module(model, name, nn.Conv2d, "the converted model")
        named_module(original, target, nn.Conv2d, "the original model")
    first = next(iter(batches), None)
    if first is None:
        raise SurgeryError("the calibration data yielded no images")
    fits = []
    with eval_mode(model, original), torch.no_grad():
        order = execution_order(model, list(convs), first[0].to(device))
        for i, name in enumerate(order):
            conv, ref = model.get_submodule(name), original.get_submodule(convs[name])
            sums = _LeastSquares(conv, seed=i)
            for images, _ in tqdm(batches, desc=f"refit {name}", disable=not progress, leave=False):
                images = images.to(device)
                sums.add(capture(model, conv, images, "input"), capture(original, ref, images, "output"))
            before, after = sums.solve(ridge)
            fits.append(ConvFit(name, convs[name], sums.rows, sums.d, before, after))
    return fits
