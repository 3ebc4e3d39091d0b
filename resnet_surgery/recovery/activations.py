"""Reading a model's activations with hooks: one module's input or output, the order of the forward pass,
and the modules a recipe names, looked up with an error that says which model lacks them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import SurgeryError

__all__ = ["capture", "execution_order", "named_module", "run_hooked", "submodule"]


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the wanted activation is captured."""


def capture(model: nn.Module, module: nn.Module, images: torch.Tensor, what: str) -> torch.Tensor:
    """The input or output of ``module`` when ``model`` runs on ``images``; the rest of the forward is skipped.

    Args:
        model: the model to run.
        module: a module of ``model``.
        images: the input batch.
        what: "input" (the module's first argument) or "output".

    Returns:
        Tensor: the activation.
    """
    got = []

    def pre_hook(_, args):
        got.append(args[0])
        raise _Stop

    def hook(_, args, output):
        got.append(output)
        raise _Stop

    handle = module.register_forward_pre_hook(pre_hook) if what == "input" else module.register_forward_hook(hook)
    try:
        model(images)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not got:
        raise SurgeryError(f"the forward pass never called {type(module).__name__} module; is it used?")
    return got[0]


def run_hooked(model: nn.Module, handles: list, images: torch.Tensor) -> None:
    """Run ``model`` on ``images`` without gradients for the hooks ``handles`` to see, then remove them.

    Args:
        model: the model to run.
        handles: the hook handles to remove afterwards.
        images: the input batch.
    """
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()


def execution_order(model: nn.Module, names: Sequence[str], images: torch.Tensor) -> list[str]:
    """``names`` sorted by when the forward first calls them.

    Args:
        model: the model to run.
        names: module names of ``model`` (convs, blocks).
        images: the input batch.

    Returns:
        list: the names in forward order.
    """
    order: list[str] = []

    def seen(name):
        return lambda *_: order.append(name) if name not in order else None

    run_hooked(model, [model.get_submodule(n).register_forward_pre_hook(seen(n)) for n in names], images)
    missing = [n for n in names if n not in order]
    if missing:
        raise SurgeryError(f"the forward pass never calls {', '.join(missing)}; is the recipe from this model?")
    return order


def named_module(model: nn.Module, name: str, kind: type, what: str) -> nn.Module:
    """The module ``name`` of ``model``, which a recipe names; a SurgeryError when it is missing or not a ``kind``.

    Args:
        model: the model to look in.
        name: the module's path.
        kind: the module type it must have.
        what: the model in the error message ("the converted model").

    Returns:
        Module: the module.
    """
    try:
        m = model.get_submodule(name)
    except AttributeError:
        raise SurgeryError(f"{what} has no module {name!r} named in the recipe; pass the matching model") from None
    if not isinstance(m, kind):
        raise SurgeryError(f"{what} module {name!r} is a {type(m).__name__}, expected {kind.__name__}")
    return m


def submodule(model: nn.Module, name: str) -> nn.Module | None:
    """The module ``name`` of ``model``, or None when there is none (or ``name`` is empty).

    Args:
        model: the model to look in.
        name: the module's path.

    Returns:
        Module or None.
    """
    try:
        return model.get_submodule(name) if name else None
    except AttributeError:
        return None
