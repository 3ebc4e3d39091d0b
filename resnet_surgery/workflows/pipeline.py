"""The whole job in one call: load, convert, (calibrate, fine-tune), export both models with parity, time them."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from ..arguments import checked_arguments, with_overrides
from ..atomic import atomic_dir, check_writable
from ..data import preprocessing
from ..deploy import compare_latency, export_onnx
from ..engine import Recipe, convert, count_macs, max_difference
from ..errors import SurgeryError
from ..history import history
from ..recovery import RecoverOptions, calibrate, check_target_and_budget, finetune, recover
from ..store import load_model, save
from ..utils import json_text, report_dict

__all__ = ["Conversion", "RunOptions", "RunResult", "convert_model", "run_pipeline", "run_summary"]


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


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """What `run_pipeline` does besides converting: which images recover the converted model, and how both
    models are timed. Fields left at None are not done (no images: no recovery).

    Args:
        to: the target variant (as `convert` takes it).
        shortcut: the target projection shortcut.
        exact: only function-preserving rewrites.
        prune_dead: remove computation on positions nobody reads.
        weights: the model's weights (a torchvision enum name, "none", or a weights file).
        input_size: the square input size of shapes, MACs, the probe, the ONNX files and the timing.
        calibrate_data: images for `calibrate` (its default steps), or None.
        finetune_data: images for `finetune`, or None.
        recover_data: images for `recover` (instead of ``calibrate_data`` and ``finetune_data``), or None.
        preset: preprocessing of those images; None: as the model's weights were published
            (``data.preprocessing``), else "imagenet".
        num_images: calibration images.
        iterations: reconstruction steps per block (None: `calibrate`'s).
        epochs: fine-tuning epochs.
        finetune_images: fine-tune on a seeded subset of that many images.
        objective: what fine-tuning matches ("logits", "features", "both").
        finetune_steps: fine-tuning optimizer steps instead of ``epochs``.
        augment: fine-tuning's augmentation (as `FinetuneOptions`).
        target: `recover`'s target gap (points).
        budget: `recover`'s wall-time budget (seconds).
        batch_sizes: the batch sizes to time.
        threads: onnxruntime intra-op threads (None: every usable core).
        min_time_s: seconds of timing per batch size.
    """

    to: str | None = None
    shortcut: str | None = None
    exact: bool = False
    prune_dead: bool = False
    weights: str = "none"
    input_size: int = 224
    calibrate_data: object = None
    finetune_data: object = None
    recover_data: object = None
    preset: str | None = None
    num_images: int = 2048
    iterations: int | None = None
    epochs: int = 1
    finetune_images: int | None = None
    objective: str = "logits"
    finetune_steps: int | None = None
    augment: str = "auto"
    target: float | None = None
    budget: float | None = None
    batch_sizes: Sequence[int] | int = (1,)
    threads: int | None = None
    min_time_s: float = 5.0


@dataclasses.dataclass
class RunResult:
    """What `run_pipeline` did; ``str()`` is the summary `resnet-surgery run` prints, ``to_dict()`` its report.json.

    Args:
        model: the model's name or folder.
        weights: its weights.
        variants: the variant before and after.
        macs: MACs per image, "original" and "converted" (of the trunk for a detection model).
        exact: whether the conversion preserves the function.
        parity: each ONNX file's parity report (as a dict).
        latency: the latency comparison (as a dict).
        latency_table: the latency comparison as a table.
        out: the output folder.
        max_abs_diff: the largest output difference on a probe input, when probed.
        calibration: calibration's report, when calibrated.
        finetune: fine-tuning's report, when fine-tuned.
        recovery: recover's report, when recovered.
    """

    model: str
    weights: str
    variants: list[str]
    macs: dict[str, int]
    exact: bool
    parity: dict = dataclasses.field(default_factory=dict)
    latency: dict = dataclasses.field(default_factory=dict)
    latency_table: str = ""
    out: str = ""
    max_abs_diff: float | None = None
    calibration: dict | None = None
    finetune: dict | None = None
    recovery: dict | None = None

    def to_dict(self) -> dict:
        """The figures as plain data (report.json): the table and the steps that did not run left out."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "latency_table"}

    def __str__(self) -> str:
        return run_summary(self)


@checked_arguments
def run_pipeline(model: str | os.PathLike, out: str | os.PathLike, *, options: RunOptions | None = None, force: bool = False,
                 progress: bool = True, echo=print, **overrides) -> RunResult:
    """Convert ``model`` and prove what that did; everything lands in ``out`` atomically: converted/ (a folder
    ``resnet_surgery.load`` reads), original.onnx, converted.onnx (both parity-checked against PyTorch),
    latency.json, latency.png and report.json. An exact conversion has nothing to recover: calibration and
    fine-tuning are skipped with a note.

    Args:
        model: a model name or a folder written by `save`.
        out: the output folder.
        options: what to do (`RunOptions`); None: its defaults.
        force: overwrite ``out`` if it exists.
        progress: show progress bars.
        echo: prints the notes.
        **overrides: `RunOptions` fields, e.g. ``run_pipeline("resnet50", "out", to="v1", weights="DEFAULT")``.

    Returns:
        What it did (also written as report.json).

    Raises:
        SurgeryError: ``out`` exists without ``force``, both ``recover_data`` and calibration or fine-tuning
            data, a bad target or budget, or any error of the steps (loading, converting, recovery, export,
            parity, timing); ``out`` is then left as it was.
        TypeError: an argument or options field of the wrong type, or an unknown field.
    """
    options, model = with_overrides(RunOptions, options, overrides, "run_pipeline()"), str(model)
    check_writable(out, force)
    if options.recover_data is not None and (options.calibrate_data or options.finetune_data):
        raise SurgeryError("recover runs calibration and fine-tuning itself: give --recover, or --calibrate and "
                           "--finetune, not both")
    check_target_and_budget(options.target, options.budget)
    steps = ["convert"] + (["calibrate"] if options.calibrate_data else [])
    steps += (["finetune"] if options.finetune_data else []) + (["recover"] if options.recover_data is not None else [])
    bar = tqdm(steps + ["export original", "export converted", "latency"], desc="run", disable=not progress,
               leave=False)
    with atomic_dir(out, force) as tmp:
        _step(bar, "convert")
        conversion = convert_model(model, options.weights, to=options.to, shortcut=options.shortcut,
                                   exact=options.exact, prune_dead=options.prune_dead, input_size=options.input_size)
        result = _conversion_result(model, options.weights, conversion, echo)
        if options.weights == "none" and not Path(model).is_dir():  # the demo's case: not to read as pretrained
            echo(f"note: {model} has random weights (--weights none): conversion, parity and latency hold, but "
                 "no accuracy is measured or implied; pass --weights DEFAULT for the pretrained model")
        bar.update()
        converted = _recover(conversion, options, tmp, result, bar, progress, echo)
        size = (3, options.input_size, options.input_size)
        timing = dict(batch_sizes=options.batch_sizes, threads=options.threads, min_time_s=options.min_time_s,
                      progress=progress)
        result.out = str(out)
        _export_and_time(conversion.original, converted, tmp, Path(out), result, bar, size, timing)
        # Saved last, with the text the command prints as its summary.txt (report.json holds the figures).
        save(converted, tmp / "converted", summary=run_summary(result))
    return result


def run_summary(result: RunResult) -> str:
    """`run_pipeline`'s result as text: the conversion, what recovery did, ONNX parity and the latency table.

    Args:
        result: what `run_pipeline` returned.

    Returns:
        The text (printed by `resnet-surgery run` and saved as the converted folder's summary.txt).
    """
    macs = result.macs
    lines = [f"{result.model} (weights {result.weights}): {result.variants[0]} -> {result.variants[1]}, "
             f"MACs {macs['original'] / 1e9:.3f} G -> {macs['converted'] / 1e9:.3f} G "
             f"({macs['converted'] / macs['original'] - 1:+.1%}), "
             + ("exact" if result.exact else "changes the function")]
    if result.calibration is not None:
        lines.append(f"calibration: {_calibration_line(result.calibration)}")
    if result.finetune is not None:
        lines.append(f"finetune: {result.finetune['steps']} steps, kept {result.finetune['kept']}")
    if result.recovery is not None:
        r = result.recovery
        lines.append(f"recover: {len(r['stages']) - 1} stages, stopped: {r['stopped']}, gap "
                     f"{[s for s in r['stages'] if s['kept']][-1]['gap']:.2f} ({r['metric']} points)")
    lines.append(f"{'ONNX parity':<20} {'max |diff|':>10} {'rel diff':>9} {'tolerance':>9}  result")
    for name, p in result.parity.items():
        tolerance = max(c["tolerance"] for c in p["checks"])
        lines.append(f"{name:<20} {p['max_abs_diff']:>10.2e} {p['max_rel_diff']:>9.2e} {tolerance:>9.2e}  "
                     f"{'passed' if p['passed'] else 'FAILED'}")
    lines.append(result.latency_table)
    return "\n".join(lines)


def _calibration_line(report: dict) -> str:
    """A calibration report's dict in one line: where its last step left the model (agreement with the original,
    or the relative output error of a model whose outputs are not class logits)."""
    last = report["steps"][-1]
    measure = (f"output error {last['output_error']:.4f}" if last["output_error"] is not None
               else f"agreement with the original {last['agreement']['agreement']:.2f}%")
    return f"{len(report['steps']) - 1} steps on {report['num_images']} images, {measure} after {last['step']}"


def _step(bar, name: str) -> None:
    bar.set_description(name)
    bar.update(0)


def _conversion_result(model: str, weights: str, conversion: Conversion, echo) -> RunResult:
    """The result's figures of the conversion; its notices echoed."""
    recipe = conversion.recipe
    for note in recipe.notices:
        echo(f"note: {note}")
    return RunResult(model, weights, [str(recipe.variant_before), str(recipe.variant_after)],
                     {"original": conversion.macs_before, "converted": conversion.macs_after}, recipe.exact,
                     max_abs_diff=None if conversion.probe is None else conversion.probe[0])


def _recover(conversion: Conversion, settings: RunOptions, tmp: Path, result: RunResult, bar, progress: bool,
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
        result.recovery = report_dict(history(converted).recovery)
        bar.update()
    if calibrate_data:
        _step(bar, "calibrate")
        iterations = {} if settings.iterations is None else {"iterations": settings.iterations}
        converted = calibrate(converted, original, calibrate_data, num_images=settings.num_images, preset=preset,
                              transform=transform, progress=progress, **iterations)
        result.calibration = report_dict(history(converted).calibration)
        bar.update()
    if finetune_data:
        _step(bar, "finetune")
        converted = finetune(converted, original, finetune_data, objective=settings.objective,
                             epochs=settings.epochs, steps=settings.finetune_steps, augment=settings.augment,
                             preset=preset, transform=transform, num_images=settings.finetune_images,
                             checkpoint=tmp / "finetune.ckpt", progress=progress)
        result.finetune = report_dict(history(converted).finetune)
        # The checkpoint only matters to a run that may be resumed; this one finished.
        (tmp / "finetune.ckpt").unlink(missing_ok=True)
        bar.update()
    return converted


def _export_and_time(original: nn.Module, converted: nn.Module, tmp: Path, out: Path, result: RunResult, bar,
                     size, timing: dict) -> None:
    """Export both models with parity, time them, and write latency.json, latency.png and report.json (their
    paths named as they will be once ``tmp`` is renamed to ``out``)."""
    parity = {}
    for name, m in (("original", original), ("converted", converted)):
        _step(bar, f"export {name}")
        parity[name] = export_onnx(m, tmp / f"{name}.onnx", input_size=size).to_dict()
        bar.update()
    result.parity = final_paths(parity, tmp, out)
    _step(bar, "latency")
    latency = compare_latency({"original": tmp / "original.onnx", "converted": tmp / "converted.onnx"},
                              macs=result.macs, **timing)
    bar.update()
    bar.close()
    result.latency, result.latency_table = final_paths(latency.to_dict(), tmp, out), str(latency)
    (tmp / "latency.json").write_text(json_text(result.latency))
    latency.plot(tmp / "latency.png")
    (tmp / "report.json").write_text(json_text(result.to_dict()))


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
