"""Probing a model: compare two models' outputs on a seeded random input, and flatten any output to tensors."""

from __future__ import annotations

import torch
from torch import nn

from ..arguments import checked_arguments
from ..defaults import MAX_BATCH
from ..errors import SurgeryError
from ..history import history
from ..utils import check_model, eval_mode, image_size, model_device, model_runs_at

__all__ = ["max_difference", "output_tensors"]


@checked_arguments
def max_difference(a: nn.Module, b: nn.Module, input_size=(3, 224, 224), batch: int = 2, seed: int = 0):
    """Max |a(x) - b(x)| and max |a(x)| on a seeded random probe, both models in eval mode; over every output
    tensor (a feature pyramid's levels). When ``b``'s recipe names a trunk (a detection model's backbone), the
    two trunks are compared: the rest of the model is not rewritten.

    A NaN or inf output fails (SurgeryError): nothing can be verified with it.

    Args:
        a: the original model (its training flags are given back afterwards, as ``b``'s).
        b: the converted model.
        input_size: an int N or (C, H, W): the size of the probe images (default 3 x 224 x 224).
        batch: how many probe images.
        seed: the seed of the random probe.

    Returns:
        (max |a(x) - b(x)|, max |a(x)|).

    Raises:
        SurgeryError: ``batch`` out of range, the models do not run at ``input_size``, ``a`` returns no tensor, an output is NaN or
            inf, or the output shapes differ.
        TypeError: ``a`` or ``b`` is not a torch module, or another argument of the wrong type.
    """
    check_model(a, "a"), check_model(b, "b")
    input_size = image_size(input_size)
    if not 1 <= batch <= MAX_BATCH:
        raise SurgeryError(f"max_difference's batch takes an integer from 1 to {MAX_BATCH}, got {batch}")
    recipe = history(b).recipe
    if recipe is not None and recipe.trunk:
        a, b = a.get_submodule(recipe.trunk), b.get_submodule(recipe.trunk)
    x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(seed)).to(model_device(a))
    with eval_mode(a, b), torch.no_grad(), model_runs_at(input_size):
        ya, yb = output_tensors(a(x)), output_tensors(b(x))
    if not ya:
        raise SurgeryError(f"{type(a).__name__} returns no tensor on a probe image batch, so the rewrite cannot be "
                           "verified by a probe")
    for which, ys in (("original", ya), ("converted", yb)):
        if not all(torch.isfinite(y).all() for y in ys):
            raise SurgeryError(f"the {which} model's output on a probe input is not finite (NaN or inf), so the "
                               "rewrite cannot be verified; check its weights for NaN/inf")
    if [y.shape for y in ya] != [y.shape for y in yb]:
        raise SurgeryError(f"the converted model's outputs have shapes {[list(y.shape) for y in yb]}, the "
                           f"original's {[list(y.shape) for y in ya]}")
    return (max(float((u - v).abs().max()) for u, v in zip(ya, yb)), max(float(u.abs().max()) for u in ya))


def output_tensors(out) -> list[torch.Tensor]:
    """The tensors of a model's output in order: a tensor, or those inside dicts, lists and tuples."""
    if isinstance(out, torch.Tensor):
        return [out]
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else []
    return [t for item in items for t in output_tensors(item)]
