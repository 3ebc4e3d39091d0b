"""What explore reads, checked as input before any work: its options, the images, the labels against the
model's classes, and an earlier run's candidate folders (files it wrote itself may have been damaged or
edited since, so they are validated like any other input and never lead outside ``--out``)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset

from ..arguments import with_overrides
from ..atomic import check_writable
from ..defaults import EXPLORE_STAGES
from ..deploy import check_batch_sizes
from ..errors import SurgeryError
from ..recovery import check_label_classes, check_stages, check_target_and_budget

__all__ = ["ExploreOptions", "ONNX_FILE", "RESULT_FILE", "explore_options", "check_candidates_folder", "check_explore_out", "check_explore_request", "reusable_result",
           "saved_model"]

RESULT_FILE = "result.json"
ONNX_FILE = "model.onnx"
_EVAL_KEYS = ("top1", "agreement", "kl")


@dataclasses.dataclass(frozen=True)
class ExploreOptions:
    """What `explore` builds, how it recovers, quantizes and times the candidates.

    Args:
        variants: the candidates, names in VARIANTS (None: all; the original is always the baseline).
        int8: also quantize every candidate to int8.
        calibrate_images: images each candidate's recovery calibrates on.
        stages: `recover`'s stages per candidate (("bn",) is the cheap one, when only latency matters).
        target: `recover`'s target gap per candidate, in points (None: none).
        budget: wall seconds of recovery per candidate (None: no limit).
        eval_images: held-out images (None: all of ``eval_data``, else 1000 of ``data``, at most half).
        quant_images: images int8 calibration uses.
        min_agreement: keep an int8 file when its top-1 agrees with its fp32 file's on at least this
            percentage of the held-out images.
        batch_sizes: batch sizes to time.
        threads: intra-op threads of the timing (None: every usable core).
        min_time_s: seconds of timing per batch size, at least.
        max_time_s: seconds of timing per batch size, at most (None: 3 x ``min_time_s``).
        batch_size: images per batch of recovery, calibration and evaluation.
        preset: the preprocessing preset of a path, "imagenet" or "cifar10" (None: see `preprocessing`).
        transform: the preprocessing of a path's images (None: ``preset``'s, see `preprocessing`).
        seed: seed of the held-out split, recovery, quantization and timing.
    """

    variants: Sequence[str] | None = None
    int8: bool = True
    calibrate_images: int = 2048
    stages: Sequence[str] = EXPLORE_STAGES
    target: float | None = None
    budget: float | None = None
    eval_images: int | None = None
    quant_images: int = 512
    min_agreement: float = 98.0
    batch_sizes: Sequence[int] = (1,)
    threads: int | None = None
    min_time_s: float = 5.0
    max_time_s: float | None = None
    batch_size: int = 64
    preset: str | None = None
    transform: object = None
    seed: int = 0


def explore_options(options: ExploreOptions | None, overrides: dict) -> ExploreOptions:
    """``options`` with ``overrides`` set, every field's type and `recover`'s stages, target and budget checked.

    Args:
        options: the options given, or None (the defaults).
        overrides: field names and values to set.

    Returns:
        ExploreOptions: the options to run with.

    Raises:
        TypeError: an override that is not a field, or a field of the wrong type.
        SurgeryError: unknown stages, or a target or budget that is not a number above zero.
    """
    options = with_overrides(ExploreOptions, options, overrides, "explore()")
    check_stages(options.stages)
    check_target_and_budget(options.target, options.budget)
    return options


def check_explore_request(model, calib_set: Dataset, eval_set: Dataset, input_size: tuple[int, int, int],
                          options: dict) -> None:
    """Refuse options, images and labels that would fail (or mislead) only after candidates were built.

    Args:
        model: the original model.
        calib_set: the calibration images.
        eval_set: the held-out images.
        input_size: the size every candidate is exported at.
        options: explore's numeric options by name (calibrate_images, quant_images, min_agreement,
            batch_sizes, threads).
    """
    for name in ("calibrate_images", "quant_images"):
        _check_int(options[name], name, low=1)
    agreement = options["min_agreement"]
    if not isinstance(agreement, (int, float)) or not 0 <= agreement <= 100:
        raise SurgeryError(f"min_agreement (--min-agreement) is a percentage from 0 to 100, got {agreement!r}")
    check_batch_sizes(options["batch_sizes"], options["threads"])
    for what, images in (("data", calib_set), ("held-out", eval_set)):
        shape = list(_first_image(images).shape)
        if shape != list(input_size):
            raise SurgeryError(f"the {what} images are {shape} but the candidates are exported at {list(input_size)}; "
                               "preprocess them to that size (--preset, --size) or pass a matching --input-size")
    check_label_classes(model, eval_set, "the held-out images (--eval-data, else --data)")


def _check_int(value, name: str, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise SurgeryError(f"{name} (--{name.replace('_', '-')}) takes an integer of at least {low}, got {value!r}")


def _first_image(images: Dataset):
    item = images[0]
    return item[0] if isinstance(item, (tuple, list)) else item


def check_explore_out(out: str | os.PathLike) -> Path:
    """A new folder that can be written, or one an earlier explore wrote (to resume); never someone else's
    folder. Checked before any work starts."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "candidates").is_dir())):
        raise SurgeryError(f"{out} exists and is not an explore folder; pass a new --out (or an earlier explore's "
                           "to resume it)")
    check_candidates_folder(out)
    return check_writable(out, force=True)  # an earlier explore's folder is resumed, not refused


def check_candidates_folder(out: Path) -> None:
    """Refuse an ``out``/candidates that is a link or not a folder: candidates are written inside it, and a
    rebuild would then write (and replace folders) outside ``out``.

    Args:
        out: the explore folder.
    """
    candidates = out / "candidates"
    if candidates.is_symlink() or (candidates.exists() and not candidates.is_dir()):
        raise SurgeryError(f"{candidates} is a link or a file, not a folder explore wrote; explore never writes "
                           "through it: pass a new --out")


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path``, links followed, stays under ``root``: nothing outside --out is ever read."""
    return path.resolve().is_relative_to(root.resolve())


def _number(value, optional: bool = False) -> bool:
    if value is None:
        return optional
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _well_formed(result: dict, name: str) -> bool:
    """Whether a result.json holds what explore writes for candidate ``name`` (its own name, not a path)."""
    int8 = name.endswith("-int8")
    status = result.get("status")
    if (result.get("name") != name or result.get("precision") != ("int8" if int8 else "fp32")
            or not isinstance(status, str) or not status.isprintable() or not _number(result.get("seconds", 0))):
        return False
    if int8 and (result.get("source") != name.removesuffix("-int8") or not isinstance(result.get("quantization"), dict)):
        return False
    if status != "ok":
        return int8 and status.startswith("rejected: ")  # explore writes fp32 folders only when they worked
    ev = result.get("eval")
    return (isinstance(ev, dict) and all(_number(ev.get(k), optional=True) for k in _EVAL_KEYS)
            and _number(result.get("macs")) and isinstance(result.get("exact"), bool))


def reusable_result(candidates: Path, name: str, settings: dict) -> dict | None:
    """The result of a finished candidate when it can be reused as it is; None when it must be (re)built:
    missing, damaged, made with other settings, naming another candidate, or leading outside ``candidates``.

    Args:
        candidates: the folder holding the candidate folders (``out``/candidates).
        name: the candidate, a name explore itself makes.
        settings: this run's settings; a result made with others is rebuilt.

    Returns:
        The parsed result.json, or None.
    """
    folder = candidates / name
    file = folder / RESULT_FILE
    if not _inside(file, candidates) or not file.is_file():
        return None
    try:
        result = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError):  # unreadable, not UTF-8, not JSON, nested too deep
        return None
    if not isinstance(result, dict) or result.get("settings") != settings or not _well_formed(result, name):
        return None
    onnx = folder / ONNX_FILE
    if result["status"] == "ok" and not (_inside(onnx, candidates) and onnx.is_file()):
        return None
    return result


def saved_model(candidates: Path, name: str) -> Path | None:
    """The saved model folder of a finished candidate, None when it is missing or leads outside ``candidates``.

    Args:
        candidates: the folder holding the candidate folders.
        name: the candidate.

    Returns:
        ``candidates``/name/model, or None.
    """
    folder = candidates / name / "model"
    files = [folder / "recipe.json", folder / "model.safetensors"]
    return folder if all(_inside(f, candidates) and f.is_file() for f in files) else None
