"""What explore reads, checked as input before any work: its options, the images, the labels against the
model's classes, and an earlier run's candidate folders (files it wrote itself may have been damaged or
edited since, so they are validated like any other input and never lead outside ``--out``)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from torch.utils.data import Dataset

from ..atomic import check_writable
from ..deploy.latency import check_batch_sizes
from ..errors import SurgeryError
from ..recovery.evaluate import check_label_classes

__all__ = ["ONNX_FILE", "RESULT_FILE", "check_candidates_folder", "check_explore_out", "check_explore_request", "reusable_result",
           "saved_model"]

RESULT_FILE = "result.json"
ONNX_FILE = "model.onnx"
_EVAL_KEYS = ("top1", "agreement", "kl")


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
