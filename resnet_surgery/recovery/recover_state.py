"""`recover`'s checkpoint: the best model so far, the stages measured, the time spent and where to continue,
written atomically after every stage and read back only by the run it belongs to."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_file
from ..errors import SurgeryError, first_line
from ..zoo import torch_load
from .recover_report import RecoveryStage

__all__ = ["load_state", "save_state"]

FORMAT = "resnet-surgery-recover/1"


def save_state(path: Path, model: nn.Module, *, identity: dict, position: tuple[int, int], spent: tuple[float, float],
               stages: list[RecoveryStage], step_seconds: dict, measure_seconds: float) -> None:
    """Write the checkpoint atomically (a kill leaves the previous one).

    Args:
        path: the checkpoint file.
        model: the best model so far.
        identity: the run's `run_identity`.
        position: (stage index, round) to continue at.
        spent: (CPU, wall) seconds spent so far.
        stages: the stages measured so far.
        step_seconds: stage -> measured wall seconds per step.
        measure_seconds: wall seconds of one measurement on the held-back images.
    """
    state = {"format": FORMAT, "identity": identity, "model": model.state_dict(), "position": list(position),
             "spent": list(spent), "stages": [dataclasses.asdict(s) for s in stages],
             "step_seconds": dict(step_seconds), "measure_seconds": measure_seconds}
    with atomic_file(path, force=True) as tmp:
        torch.save(state, tmp)


def load_state(path: Path, converted: nn.Module, identity: dict) -> dict:
    """Read a checkpoint back, once it is shown to belong to this run and every value is checked.

    Args:
        path: the checkpoint file.
        converted: the converted model the run started from (the saved weights go into a copy).
        identity: the run's `run_identity`.

    Returns:
        dict: "model", "position", "spent", "stages", "step_seconds" and "measure_seconds".

    Raises:
        SurgeryError: no file, another run's, or a damaged one.
    """
    if not path.is_file():
        raise SurgeryError(f"no recover checkpoint at {path} to resume from; run without --resume to start fresh")
    state = torch_load(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise SurgeryError(f"{path} is not a recover checkpoint; pass the right --out or start over with --force")
    if state.get("identity") != identity:
        raise SurgeryError(f"{path} belongs to another recover run (another model, data or options); resume with "
                           "the same ones or start over with --force")
    try:
        found = {"position": tuple(int(v) for v in state["position"]),
                 "spent": tuple(float(v) for v in state["spent"]),
                 "stages": [RecoveryStage.from_dict(s, str(path)) for s in state["stages"]],
                 "step_seconds": {str(k): float(v) for k, v in state["step_seconds"].items()},
                 "measure_seconds": float(state["measure_seconds"]), "model": copy.deepcopy(converted)}
        found["model"].load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise SurgeryError(f"{path} is not a readable recover checkpoint ({first_line(e)}); start over with "
                           "--force") from None
    numbers = [*found["spent"], *found["step_seconds"].values(), found["measure_seconds"]]
    if (len(found["position"]) != 2 or min(found["position"]) < 0 or len(found["spent"]) != 2 or not found["stages"]
            or not all(math.isfinite(v) and v >= 0 for v in numbers)):
        raise SurgeryError(f"{path} holds values out of range; start over with --force")
    if not all(torch.isfinite(t).all() for t in found["model"].state_dict().values() if t.is_floating_point()):
        raise SurgeryError(f"{path} holds non-finite weights; start over with --force")
    return found
