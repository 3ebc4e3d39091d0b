"""The whole job in one call: load, convert, (calibrate, fine-tune), export both models with parity, time them."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from ..atomic import atomic_dir, check_writable
from ..data import preprocessing
from ..deploy import LatencyReport, compare_latency, export_onnx
from ..engine import Recipe, convert, count_macs, max_difference
from ..errors import SurgeryError
from ..history import history
from ..recovery import RecoverOptions, calibrate, check_target_and_budget, finetune, recover
from ..store import load_model, save
from ..utils import report_dict

__all__ = ["Conversion", "RecoverySettings", "convert_model", "run_pipeline", "run_summary"]


@dataclasses.dataclass
class Conversion:
    """A loaded model, its conversion and what the conversion did to its MACs and outputs."""

    original: nn.Module
    converted: nn.Module
    macs_before: int  # per image; of the trunk for a detection model (what the conversion rewrote)
    macs_after: int
    probe: tuple[float, float] | None  # (max |difference|, max |output|) on a probe input, when probed

    @property
    def recipe(self) -> Recipe:
        """The converted model's recipe (its notices, rewrites, variants)."""
        return history(self.converted).recipe


def convert_model(model: str, weights: str = "none", *, to=None, shortcut=None, exact: bool = False,
                  prune_dead: bool = False, input_size: int = 224, probe: bool | None = None) -> Conversion:
    """Load ``model`` and convert it, without warnings: the notices are in ``.recipe.notices`` for the caller.

    Args:
        model: a model name or a folder written by `save`.
        weights: its weights (a torchvision enum name, none, or a weights file).
        to: the target variant.
        shortcut: the target projection shortcut.
        exact: only function-preserving rewrites.
        prune_dead: remove computation on positions nobody reads.
        input_size: the square input size of shapes, MACs and the probe.
        probe: compare the two models on a probe input; None: when the conversion is exact and rewrote something.

    Returns:
        The conversion.
    """
    size = (3, input_size, input_size)
    original = load_model(model, weights)
    converted = convert(original, to, shortcut=shortcut, exact=exact, prune_dead=prune_dead, input_size=size,
                        warn=False)
    recipe = history(converted).recipe
    part = recipe.trunk  # a detection model: its trunk is what changed, and what to measure
    before, after = (count_macs(m.get_submodule(part) if part else m, size) for m in (original, converted))
    if probe is None:
        probe = recipe.exact and bool(recipe.rewrites)
    difference = max_difference(original, converted, size) if probe else None
    return Conversion(original, converted, before, after, difference)


def run_pipeline(model: str, *, to=None, shortcut=None, exact=False, prune_dead=False, weights="none",
                 out: str | os.PathLike, force=False, input_size=224, calibrate_data=None, finetune_data=None,
                 preset=None, num_images=2048, iterations=None, epochs=1, finetune_images=None, objective="logits",
                 finetune_steps=None, augment="auto", recover_data=None, target=None, budget=None, batch_sizes=(1,),
                 threads=None, min_time_s=5.0, progress=True, echo=print) -> dict:
    """Convert ``model`` and prove what that did; everything lands in ``out`` atomically: converted/ (a folder
    ``resnet_surgery.load`` reads), original.onnx, converted.onnx (both parity-checked against PyTorch),
    latency.json, latency.png and report.json. An exact conversion has nothing to recover: calibration and
    fine-tuning are skipped with a note.

    Args:
        model, weights, to, shortcut, exact, prune_dead, input_size: as `convert_model`.
        out: the output folder.
        force: overwrite ``out`` if it exists.
        calibrate_data: images for `calibrate` (its default steps), or None.
        finetune_data: images for `finetune`, or None.
        preset: preprocessing of those images; None: as the model's weights were published
            (``data.preprocessing``), else "imagenet".
        num_images, iterations: calibration images and reconstruction steps per block (None: `calibrate`'s).
        epochs, finetune_images, objective, finetune_steps, augment: as `finetune` takes them.
        recover_data: images for `recover` (instead of ``calibrate_data`` and ``finetune_data``), or None.
        target, budget: `recover`'s target gap (points) and wall-time budget (seconds), or None.
        batch_sizes, threads, min_time_s: as `compare_latency` takes them.
        progress: show progress bars.
        echo: prints the notes.

    Returns:
        The report (also written as report.json), with "out" and the printable "latency_table".
    """
    check_writable(out, force)
    if recover_data is not None and (calibrate_data or finetune_data):
        raise SurgeryError("recover runs calibration and fine-tuning itself: give --recover, or --calibrate and "
                           "--finetune, not both")
    check_target_and_budget(target, budget)
    steps = ["convert"] + (["calibrate"] if calibrate_data else []) + (["finetune"] if finetune_data else [])
    steps += ["recover"] if recover_data is not None else []
    bar = tqdm(steps + ["export original", "export converted", "latency"], desc="run", disable=not progress,
               leave=False)
    result: dict = {"model": model, "weights": weights}
    with atomic_dir(out, force) as tmp:
        _step(bar, "convert")
        conversion = convert_model(model, weights, to=to, shortcut=shortcut, exact=exact, prune_dead=prune_dead,
                                   input_size=input_size)
        result.update(_conversion_result(conversion, echo))
        if weights == "none" and not Path(model).is_dir():  # the demo's case: its figures must not read as pretrained
            echo(f"note: {model} has random weights (--weights none): conversion, parity and latency hold, but "
                 "no accuracy is measured or implied; pass --weights DEFAULT for the pretrained model")
        bar.update()
        recovery = RecoverySettings(calibrate_data, finetune_data, preset, num_images, iterations, epochs,
                                    finetune_images, objective, finetune_steps, augment, recover_data, target, budget)
        converted = _recover(conversion, recovery, tmp, result, bar, progress, echo)
        size = (3, input_size, input_size)
        latency = _export_and_time(conversion.original, converted, tmp, Path(out), result, bar, size,
                                   dict(batch_sizes=batch_sizes, threads=threads, min_time_s=min_time_s,
                                        progress=progress))
        result["latency_table"] = str(latency)
        # Saved last, with the text the command prints as its summary.txt (report.json holds the figures).
        save(converted, tmp / "converted", summary=run_summary(result))
    result["out"] = str(out)
    return result


def run_summary(result: dict) -> str:
    """`run_pipeline`'s result as text: the conversion, what recovery did, ONNX parity and the latency table.

    Args:
        result: what `run_pipeline` returned.

    Returns:
        The text (printed by `resnet-surgery run` and saved as the converted folder's summary.txt).
    """
    macs = result["macs"]
    lines = [f"{result['model']} (weights {result['weights']}): {result['variants'][0]} -> {result['variants'][1]}, "
             f"MACs {macs['original'] / 1e9:.3f} G -> {macs['converted'] / 1e9:.3f} G "
             f"({macs['converted'] / macs['original'] - 1:+.1%}), "
             + ("exact" if result["exact"] else "changes the function")]
    if "calibration" in result:
        lines.append(f"calibration: {_calibration_line(result['calibration'])}")
    if "finetune" in result:
        lines.append(f"finetune: {result['finetune']['steps']} steps, kept {result['finetune']['kept']}")
    if "recovery" in result:
        r = result["recovery"]
        lines.append(f"recover: {len(r['stages']) - 1} stages, stopped: {r['stopped']}, gap "
                     f"{[s for s in r['stages'] if s['kept']][-1]['gap']:.2f} ({r['metric']} points)")
    lines.append(f"{'ONNX parity':<20} {'max |diff|':>10} {'rel diff':>9} {'tolerance':>9}  result")
    for name, p in result["parity"].items():
        tolerance = max(c["tolerance"] for c in p["checks"])
        lines.append(f"{name:<20} {p['max_abs_diff']:>10.2e} {p['max_rel_diff']:>9.2e} {tolerance:>9.2e}  "
                     f"{'passed' if p['passed'] else 'FAILED'}")
    lines.append(result["latency_table"])
    return "\n".join(lines)


def _calibration_line(report: dict) -> str:
    """A calibration report's dict in one line: where its last step left the model (agreement with the original,
    or the relative output error of a model whose outputs are not class logits)."""
    last = report["steps"][-1]
    measure = (f"output error {last['output_error']:.4f}" if last["output_error"] is not None
               else f"agreement with the original {last['agreement']['agreement']:.2f}%")
    return f"{len(report['steps']) - 1} steps on {report['num_images']} images, {measure} after {last['step']}"


@dataclasses.dataclass
class RecoverySettings:
    """What `run_pipeline` recovers the converted model with (see its arguments)."""

    calibrate_data: object = None
    finetune_data: object = None
    preset: str | None = None
    num_images: int = 2048
    iterations: int | None = None
    epochs: int = 1
    finetune_images: int | None = None
    objective: str = "logits"
    finetune_steps: int | None = None
    augment: str = "auto"
    recover_data: object = None
    target: float | None = None
    budget: float | None = None


def _step(bar, name: str) -> None:
    bar.set_description(name)
    bar.update(0)


def _conversion_result(conversion: Conversion, echo) -> dict:
    """The report's figures of the conversion; its notices echoed."""
    recipe = conversion.recipe
    for note in recipe.notices:
        echo(f"note: {note}")
    result = {"macs": {"original": conversion.macs_before, "converted": conversion.macs_after},
              "variants": [str(recipe.variant_before), str(recipe.variant_after)], "exact": recipe.exact}
    if conversion.probe is not None:
        result["max_abs_diff"] = conversion.probe[0]
    return result


def _recover(conversion: Conversion, settings: RecoverySettings, tmp: Path, result: dict, bar, progress: bool,
             echo) -> nn.Module:
    """Calibrate and fine-tune the converted model as ``settings`` ask (nothing for an exact conversion)."""
    original, converted = conversion.original, conversion.converted
    calibrate_data, finetune_data = settings.calibrate_data, settings.finetune_data
    if conversion.recipe.exact and (calibrate_data or finetune_data or settings.recover_data is not None):
        echo("note: the conversion is exact, so there is nothing to calibrate or fine-tune; skipped")
        bar.update(bool(calibrate_data) + bool(finetune_data) + (settings.recover_data is not None))
        return converted
    transform, preset = preprocessing(original, settings.preset), None  # the rule every step follows
    if settings.recover_data is not None:
        _step(bar, "recover")
        options = RecoverOptions(calibrate_images=settings.num_images, iterations=settings.iterations, preset=preset,
                                 transform=transform)
        converted = recover(converted, original, settings.recover_data, target=settings.target,
                            budget=settings.budget, options=options, checkpoint=tmp / "recover.pt", progress=progress,
                            echo=echo)
        result["recovery"] = report_dict(history(converted).recovery)
        bar.update()
    if calibrate_data:
        _step(bar, "calibrate")
        iterations = {} if settings.iterations is None else {"iterations": settings.iterations}
        converted = calibrate(converted, original, calibrate_data, num_images=settings.num_images, preset=preset,
                              transform=transform, progress=progress, **iterations)
        result["calibration"] = report_dict(history(converted).calibration)
        bar.update()
    if finetune_data:
        _step(bar, "finetune")
        converted = finetune(converted, original, finetune_data, objective=settings.objective,
                             epochs=settings.epochs, steps=settings.finetune_steps, augment=settings.augment,
                             preset=preset, transform=transform, num_images=settings.finetune_images,
                             checkpoint=tmp / "finetune.ckpt", progress=progress)
        result["finetune"] = report_dict(history(converted).finetune)
        # The checkpoint only matters to a run that may be resumed; this one finished.
        (tmp / "finetune.ckpt").unlink(missing_ok=True)
        bar.update()
    return converted


def _export_and_time(original: nn.Module, converted: nn.Module, tmp: Path, out: Path, result: dict, bar, size,
                     timing: dict) -> LatencyReport:
    """Export both models with parity, time them, and write latency.json, latency.png and report.json (their
    paths named as they will be once ``tmp`` is renamed to ``out``)."""
    parity = {}
    for name, m in (("original", original), ("converted", converted)):
        _step(bar, f"export {name}")
        parity[name] = export_onnx(m, tmp / f"{name}.onnx", input_size=size).to_dict()
        bar.update()
    result["parity"] = final_paths(parity, tmp, out)
    _step(bar, "latency")
    latency = compare_latency({"original": tmp / "original.onnx", "converted": tmp / "converted.onnx"},
                              macs=result["macs"], **timing)
    bar.update()
    bar.close()
    result["latency"] = final_paths(latency.to_dict(), tmp, out)
    (tmp / "latency.json").write_text(json.dumps(result["latency"], indent=2, default=str) + "\n")
    latency.plot(tmp / "latency.png")
    (tmp / "report.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return latency


def final_paths(value, tmp: Path, out: Path):
    """``value`` (JSON-ready data) with every path inside the temporary folder ``tmp`` named as it will be once
    ``tmp`` is renamed to ``out``: a report never points at a folder that is gone.

    Args:
        value: dicts, lists, strings and paths, nested.
        tmp: the temporary output folder.
        out: the final one.

    Returns:
        The same structure, paths under ``tmp`` rewritten (as strings).
    """
    if isinstance(value, dict):
        return {k: final_paths(v, tmp, out) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [final_paths(v, tmp, out) for v in value]
    if isinstance(value, str | Path) and Path(value).is_relative_to(tmp):
        return str(out / Path(value).relative_to(tmp))
    return value
