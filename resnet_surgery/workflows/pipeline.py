"""The whole job in one call: load, convert, (calibrate, fine-tune), export both models with parity, time them."""

from __future__ import annotations

import json
import os

from tqdm.auto import tqdm

from ..atomic import atomic_dir, check_writable
from ..data import model_transform
from ..engine.inspect import count_macs
from ..engine.probe import max_difference
from ..engine.rewrite import convert
from ..history import history
from ..store import load_model, save
from ..utils import report_dict


def run_pipeline(model: str, *, to=None, shortcut=None, exact=False, prune_dead=False, weights="none",
                 out: str | os.PathLike, force=False, input_size=224, calibrate_data=None, finetune_data=None,
                 preset=None, num_images=2048, iterations=None, epochs=1, finetune_images=None, objective="logits",
                 finetune_steps=None, augment="auto", batch_sizes=(1,), threads=None, min_time_s=5.0, progress=True,
                 echo=print) -> dict:
    """Convert ``model`` and prove what that did; everything lands in ``out`` atomically.

    Calibration uses `calibrate`'s default steps (BatchNorm, then block reconstruction of ``iterations`` steps
    per block, default `calibrate`'s); fine-tuning takes
    ``objective``, ``finetune_steps`` (instead of ``epochs``) and ``augment`` as `finetune` does. An exact
    conversion has nothing to recover: both steps are skipped with a note.
    ``out`` gets: converted/ (a folder ``resnet_surgery.load`` reads), original.onnx, converted.onnx
    (both parity-checked against PyTorch), latency.json, latency.png and report.json. ``preset`` None:
    images are prepared as the model's weights were published (``data.model_transform``), else "imagenet".
    """
    from ..deploy.export import export_onnx
    from ..deploy.latency import compare_latency

    check_writable(out, force)
    size = (3, input_size, input_size)
    steps = ["load", "convert"] + (["calibrate"] if calibrate_data else []) + (["finetune"] if finetune_data else [])
    steps += ["export original", "export converted", "latency"]
    bar = tqdm(steps, desc="run", disable=not progress, leave=False)
    result: dict = {"model": model, "weights": weights}

    def step(name):
        bar.set_description(name)
        bar.update(0)

    with atomic_dir(out, force) as tmp:
        step("load")
        original = load_model(model, weights)
        bar.update()
        step("convert")
        converted = convert(original, to, shortcut=shortcut, exact=exact, prune_dead=prune_dead, input_size=size,
                            warn=False)  # the notices are echoed below
        recipe = history(converted).recipe
        for note in recipe.notices:
            echo(f"note: {note}")
        result["macs"] = {"original": count_macs(original, size), "converted": count_macs(converted, size)}
        result["variants"] = [str(recipe.variant_before), str(recipe.variant_after)]
        result["exact"] = recipe.exact
        if recipe.exact and recipe.rewrites:
            result["max_abs_diff"] = max_difference(original, converted, size)[0]
        bar.update()
        if recipe.exact and (calibrate_data or finetune_data):
            echo("note: the conversion is exact, so there is nothing to calibrate or fine-tune; skipped")
            bar.update(bool(calibrate_data) + bool(finetune_data))
            calibrate_data = finetune_data = None
        transform = model_transform(original) if preset is None else None
        preset = preset or "imagenet"
        if calibrate_data:
            from ..recovery.calibrate import calibrate

            step("calibrate")
            converted = calibrate(converted, original, calibrate_data, num_images=num_images, preset=preset,
                                  transform=transform, progress=progress,
                                  **({} if iterations is None else {"iterations": iterations}))
            result["calibration"] = report_dict(history(converted).calibration)
            bar.update()
        if finetune_data:
            from ..recovery.finetune import finetune

            step("finetune")
            converted = finetune(converted, original, finetune_data, objective=objective, epochs=epochs,
                                 steps=finetune_steps, augment=augment, preset=preset, transform=transform,
                                 num_images=finetune_images, checkpoint=tmp / "finetune.ckpt", progress=progress)
            result["finetune"] = report_dict(history(converted).finetune)
            # The checkpoint only matters to a run that may be resumed; this one finished.
            (tmp / "finetune.ckpt").unlink(missing_ok=True)
            bar.update()
        save(converted, tmp / "converted", summary=json.dumps(result, indent=2, default=str))
        parity = {}
        for name, m in (("original", original), ("converted", converted)):
            step(f"export {name}")
            parity[name] = export_onnx(m, tmp / f"{name}.onnx", input_size=size).to_dict()
            bar.update()
        result["parity"] = parity
        step("latency")
        latency = compare_latency({"original": tmp / "original.onnx", "converted": tmp / "converted.onnx"},
                                  batch_sizes=batch_sizes, threads=threads, min_time_s=min_time_s,
                                  macs=result["macs"], progress=progress)
        bar.update()
        bar.close()
        (tmp / "latency.json").write_text(json.dumps(latency.to_dict(), indent=2, default=str) + "\n")
        latency.plot(tmp / "latency.png")
        result["latency"] = latency.to_dict()
        (tmp / "report.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    result["out"] = str(out)
    result["latency_table"] = str(latency)
    return result
