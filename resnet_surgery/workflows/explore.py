"""Which variant should I deploy? Every variant the engine reaches from a model, recovered, exported, optionally
int8, evaluated on held-out images and timed together, on one accuracy/latency chart with its Pareto front.

Candidates (those that change nothing are skipped, and the report says why):

- ``original``: the model as given;
- ``v1``, ``v1.5``, ``d``: the other downsampling variants (plain, approximate rewrites), each recovered with
  `resnet_surgery.recover` (by default its BatchNorm and calibration stages; ``stages``, ``target`` and a
  per-candidate ``budget`` as `recover` takes them);
- ``v1-pruned``: v1 (recovered, when the original is not v1) with its dead computation removed (exact);
- ``v1.5-exact``: the dilated v1.5 form of a v1 original (exact);
- ``<name>-int8``: each of them quantized by `resnet_surgery.quantize_onnx` (7-bit weights: the table's "int8 w7"),
  kept when its top-1 agrees with its fp32 file on at least ``min_agreement`` percent of the held-out images.

Every candidate is exported with parity (`resnet_surgery.export_onnx`) and evaluated on images disjoint from
the calibration images: top-1 when they have labels, agreement and KL with the original always. All files
are then timed in one interleaved `resnet_surgery.compare_latency` run. Each finished candidate is a folder
``<out>/candidates/<name>/`` written atomically; a rerun with the same ``out`` and settings reuses it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..arguments import checked_arguments
from ..atomic import atomic_dir, atomic_file
from ..data import PRESETS, held_out_split, preprocessing, split_batch, transform_size
from ..defaults import EVAL_IMAGES
from ..deploy import ACTIVATIONS, OnnxModule, QuantizationError, compare_latency, export_onnx, quantize_onnx
from ..engine import Trunk, convert, find_trunk, model_variant
from ..errors import NotExactError, SurgeryError
from ..history import history
from ..recovery import RecoverOptions, evaluate, predict, recover
from ..store import load_into, save
from ..utils import check_model, image_size, json_text, report_dict, state_digest
from .explore_inputs import (
    ONNX_FILE,
    RESULT_FILE,
    ExploreOptions,
    check_explore_out,
    check_explore_request,
    explore_options,
    reusable_result,
    saved_model,
)
from .explore_report import Candidate, ExploreReport, pareto_front

__all__ = ["Candidate", "ExploreOptions", "ExploreReport", "ONNX_FILE", "RESULT_FILE", "VARIANTS", "check_explore_out", "explore", "pareto_front"]

VARIANTS = ("v1", "v1.5", "d", "v1-pruned", "v1.5-exact")


@checked_arguments
def explore(model: nn.Module, data, *, eval_data=None, input_size: int | tuple[int, int, int] | None = None,
            out: str | os.PathLike = "runs/explore", force: bool = False, options: ExploreOptions | None = None,
            progress: bool = True, **overrides) -> ExploreReport:
    """Every variant of ``model`` (module docstring), recovered on ``data``, exported, optionally int8,
    evaluated and timed together; writes ``out``/explore.json, explore.png and candidates/.

    Args:
        model: the original model, a classifier: the baseline every candidate is compared with.
        data: images for recovery (a quarter of them, at most 2,000, judge its stages) and int8 calibration:
            an ImageFolder or flat folder, a Dataset or a DataLoader; labels optional.
        eval_data: labelled held-out images (None: ``options.eval_images`` of ``data`` are held out).
        input_size: an int N or (C, H, W): the size every candidate is exported and timed at (None: the side
            the preprocessing crops image files to, else 224).
        out: the folder to write (an earlier explore's folder is resumed).
        force: rebuild finished candidates (False: a rerun with the same settings reuses them).
        options: what to build, recover, quantize and time (None: ExploreOptions()).
        progress: show progress bars.
        **overrides: fields of ExploreOptions to set on ``options`` (``variants=["d"]``, ``budget=300``).

    Returns:
        ExploreReport: every candidate's accuracy, latency and Pareto front (also in ``out``/explore.json).

    Raises:
        SurgeryError: bad options, data or ``out`` (before any work), or ``eval_data`` without labels.
        TypeError: an argument of the wrong type, or an override that is not an ExploreOptions field.
    """
    start, o = time.perf_counter(), explore_options(options, overrides)
    wanted = _wanted(o.variants)
    variant = model_variant(_classifier_trunk(check_model(model)).blocks)
    out = check_explore_out(out)
    transform = preprocessing(model, o.preset, o.transform)  # the same rule as every command's
    if input_size is None:  # the side the images come at (a preset given with a transform is not used)
        side = transform_size(transform) or PRESETS.get(o.preset, PRESETS["imagenet"])["size"]
        input_size = (3, side, side)
    input_size = image_size(input_size)
    calib_set, eval_set = _images(data, eval_data, o.eval_images, transform, o.seed)
    eval_loader = DataLoader(eval_set, batch_size=o.batch_size)
    labelled = _has_labels(eval_loader)
    if eval_data is not None and not labelled:
        raise SurgeryError("eval_data (--eval-data) has no labels: pass an ImageFolder (<root>/<class>/<image>), or "
                           "leave it out to hold out part of the data and rank by agreement with the original")
    name, settings = _settings(model, data, eval_data, input_size, o, transform, len(calib_set), len(eval_set))
    check_explore_request(model, calib_set, eval_set, input_size, {**settings, "batch_sizes": o.batch_sizes,
                                                                   "threads": o.threads})
    build = _Builder(model, variant, calib_set, eval_loader, out, settings, force, input_size, progress)
    results = _build_candidates(build, wanted, o.int8, o.quant_images, o.min_agreement, progress)
    timed, timing_start = [r for r in results if r["status"] == "ok"], time.perf_counter()
    latency = compare_latency({r["name"]: out / "candidates" / r["name"] / ONNX_FILE for r in timed},
                              batch_sizes=o.batch_sizes, threads=o.threads, min_time_s=o.min_time_s,
                              max_time_s=o.max_time_s, seed=o.seed, progress=progress)
    metric = "top1" if labelled else "agreement"
    _attach_latency(timed, latency.to_dict()["results"], metric)
    report = ExploreReport(model=name, metric=metric, settings=settings,
                           candidates=[Candidate.from_dict(r) for r in results],
                           latency=latency.to_dict(), seconds=time.perf_counter() - start,
                           latency_seconds=time.perf_counter() - timing_start)
    return _written(report, out)


def _settings(model, data, eval_data, input_size, o: ExploreOptions, transform, data_images: int,
              eval_images: int) -> tuple[str, dict]:
    """The model's name and the settings a finished candidate must share to be reused."""
    source = history(model).source
    name = source.model if source is not None else type(model).__name__
    return name, {
        "model": name, "weights": state_digest(model), "data": _describe(data), "eval_data": _describe(eval_data),
        "input_size": list(input_size), "calibrate_images": o.calibrate_images, "stages": list(o.stages),
        "target": o.target, "budget": o.budget, "data_images": data_images, "eval_images": eval_images,
        "quant_images": o.quant_images, "min_agreement": o.min_agreement, "batch_size": o.batch_size,
        "preset": o.preset, "transform": repr(transform), "seed": o.seed,
    }


def _written(report: ExploreReport, out: Path) -> ExploreReport:
    """``report`` written to ``out``/explore.json and its chart to ``out``/explore.png."""
    with atomic_file(out / "explore.json", force=True) as tmp:
        tmp.write_text(json_text(report.to_dict()))
    report.plot(out / "explore.png")
    return report


def _classifier_trunk(model: nn.Module) -> Trunk:
    """The model's blocks, found the way every step finds them; explore ranks classifiers, so a model fx traces
    only in parts (a detection model) is refused up front."""
    trunk = find_trunk(model)
    if trunk.name:
        raise SurgeryError(f"{type(model).__name__} traces only in parts (its trunk is {trunk.name}): explore ranks "
                           "classifiers by top-1; convert it with `resnet-surgery convert` and export its trunk with "
                           "`export --part backbone` instead")
    return trunk


def _build_candidates(build: _Builder, wanted: list[str], int8: bool, quant_images: int, min_agreement: float,
                      progress: bool) -> list[dict]:
    """Make (or reuse) every wanted candidate in fp32 and, when asked, its int8 file."""
    results = []
    bar = tqdm(wanted, desc="explore", disable=not progress)
    for cand in bar:
        bar.set_postfix_str(cand)
        fp32 = build.fp32(cand)
        results.append(fp32)
        if int8 and fp32["status"] == "ok":
            results.append(build.int8(fp32, quant_images, min_agreement))
    return results


def _wanted(variants) -> list[str]:
    if variants is None:
        return ["original", *VARIANTS]
    unknown = [v for v in variants if v not in VARIANTS and v != "original"]
    if unknown:
        raise SurgeryError(f"unknown variant {unknown[0]!r} to explore; choose from {', '.join(VARIANTS)}")
    return ["original", *[v for v in VARIANTS if v in variants]]


def _images(data, eval_data, eval_images, transform, seed):
    """(calibration images, held-out evaluation images), disjoint; 1000 held out of ``data`` by default."""
    return held_out_split(
        data, eval_data, keep=None, hold=eval_images if eval_data is not None else eval_images or 1000,
        transform=transform, seed=seed, too_few="the data has one image; explore holds some out for evaluation: "
                                                "pass more images or --eval-data")


def _has_labels(loader: DataLoader) -> bool:
    return split_batch(next(iter(loader)))[1] is not None


def _describe(data) -> str | None:
    return None if data is None else str(data) if isinstance(data, (str, os.PathLike)) else type(data).__name__


def _attach_latency(timed: list[dict], rows: list[dict], metric: str) -> None:
    """Each timed candidate gets its latency per batch and whether it is on that batch's Pareto front."""
    for c in timed:
        c["latency"] = {str(r["batch"]): {k: r[k] for k in ("p50_ms", "p90_ms", "ratio", "ratio_low", "ratio_high")}
                        for r in rows if r["model"] == c["name"]}
    for b in timed[0]["latency"]:
        front = pareto_front([(c["latency"][b]["ratio"], c["eval"][metric]) for c in timed])
        for c, on in zip(timed, front):
            c.setdefault("pareto", {})[b] = on


class _Builder:
    """Makes (or reuses) each candidate's folder: model, ONNX file and result.json."""

    def __init__(self, original, variant, calib_set, eval_loader, out, settings, force, input_size, progress):
        self.original, self.calib_set, self.eval_loader = original, calib_set, eval_loader
        self.out, self.settings, self.force, self.size, self.progress = out / "candidates", settings, force, input_size, progress
        self.models: dict[str, nn.Module] = {}  # recovered models built in this run, for v1-pruned
        self._reference = None
        self.variant = variant

    def reference(self) -> torch.Tensor:
        """The original's logits on the held-out images, computed once."""
        if self._reference is None:
            self._reference = predict(self.original, self.eval_loader, progress=self.progress)
        return self._reference

    def finished(self, name: str) -> dict | None:
        """The candidate's result when its folder can be reused; None (rebuild) when forced, missing or damaged."""
        return None if self.force else reusable_result(self.out, name, self.settings)

    def fp32(self, name: str) -> dict:
        done = self.finished(name)
        if done:
            return done
        start = time.perf_counter()
        try:
            model, how = self.make(name)
        except NotExactError as e:
            return {"name": name, "precision": "fp32", "status": f"skipped: {e}"}
        if model is None:
            return {"name": name, "precision": "fp32", "status": f"skipped: {how}"}
        recipe = history(model).recipe
        # Rewrites of earlier conversions count too (v1-pruned is the approximate v1, pruned exactly).
        rewrites = [r for step in recipe.conversions for r in step.rewrites] if recipe is not None else []
        variant = recipe.variant_after if recipe is not None else self.variant
        result = {"name": name, "precision": "fp32", "status": "ok", "variant": str(variant),
                  "exact": all(r.exact for r in rewrites), "rewrites": len(rewrites), **how}
        with atomic_dir(self.out / name, force=True) as tmp:
            if name != "original":
                save(model, tmp / "model", summary=json.dumps(how, indent=2, default=str))
            parity = export_onnx(model, tmp / ONNX_FILE, input_size=self.size)
            result.update(macs=parity.macs, parity={"max_abs_diff": parity.max_abs_diff, "passed": parity.passed})
            result["eval"] = evaluate(model, self.eval_loader, reference=self.reference(), progress=self.progress).to_dict()
            result.update(seconds=time.perf_counter() - start, settings=self.settings)
            (tmp / RESULT_FILE).write_text(json_text(result))
        return result

    def make(self, name: str) -> tuple[nn.Module | None, dict | str]:
        """The candidate's model and how it was made; (None, why) when the conversion changes nothing."""
        if name == "original":
            return self.original, {"recovery": None}
        if name == "v1-pruned":
            base = self.original if self.variant == "v1" else self.recovered("v1")
            if base is None:
                return None, "v1 is not reachable from this model"
            model = self.convert(base, None, prune_dead=True)
            if not history(model).recipe.rewrites:
                return None, "no dead computation to remove"
            return model, {"recovery": None if base is self.original else "as v1"}
        if name == "v1.5-exact" and self.variant != "v1":
            return None, f"the exact (dilated) v1.5 form is made from a v1 model; this one is {self.variant}"
        to, exact = ("v1.5", True) if name == "v1.5-exact" else (name, False)
        converted = self.convert(self.original, to, exact=exact)
        recipe = history(converted).recipe
        if not recipe.rewrites:
            return None, f"the model is already {name} or has no block to rewrite"
        if recipe.exact:
            return converted, {"recovery": None}
        model, how = self.recover(converted)
        self.models[name] = model
        return model, how

    def convert(self, model, to, **kwargs) -> nn.Module:
        return convert(model, to, input_size=self.size, warn=False, **kwargs)

    def recover(self, converted: nn.Module) -> tuple[nn.Module, dict]:
        s = self.settings
        # recover judges its stages on images of its own (a quarter of the data, at most EVAL_IMAGES), never on
        # the held-out images explore ranks by: a choice made on those would flatter the candidate.
        options = RecoverOptions(eval_images=max(1, min(EVAL_IMAGES, len(self.calib_set) // 4)),
                                 calibrate_images=s["calibrate_images"], stages=tuple(s["stages"]),
                                 batch_size=s["batch_size"], seed=s["seed"])
        model = recover(converted, self.original, self.calib_set, target=s["target"], budget=s["budget"],
                        options=options, progress=self.progress, echo=lambda line: None)
        report = history(model).recovery
        kept = [st.stage for st in report.stages[1:] if st.kept]
        how = {"recovery": f"recover: {', '.join(dict.fromkeys(kept)) or 'nothing kept'} ({report.stopped})",
               "recover": report_dict(report)}
        return model, how

    def recovered(self, name: str) -> nn.Module | None:
        """The recovered model of candidate ``name``: from this run, else rebuilt from its finished folder."""
        if name in self.models:
            return self.models[name]
        folder = saved_model(self.out, name)
        if self.finished(name) and folder is not None:
            try:
                return load_into(self.original, folder)
            except SurgeryError:
                pass  # a damaged folder: rebuilt below, as a missing one is
        model, _ = self.make(name)
        return model

    def int8(self, fp32: dict, quant_images: int, min_agreement: float) -> dict:
        name = f"{fp32['name']}-int8"
        done = self.finished(name)
        q = (done or {}).get("quantization", {})  # signed activations or 8-bit weights (before reduce_range): rebuilt
        if done and q.get("activations") == ACTIVATIONS[0] and q.get("reduce_range"):
            return done
        start = time.perf_counter()
        result = {**{k: fp32[k] for k in ("variant", "exact", "rewrites", "macs")}, "name": name, "precision": "int8",
                  "status": "ok", "source": fp32["name"]}
        with atomic_dir(self.out / name, force=True) as tmp:
            try:
                quant = quantize_onnx(self.out / fp32["name"] / ONNX_FILE, tmp / ONNX_FILE, self.calib_set,
                                      num_images=quant_images, parity_data=self.eval_loader.dataset,
                                      parity_images=len(self.eval_loader.dataset), min_agreement=min_agreement,
                                      batch_size=self.settings["batch_size"], seed=self.settings["seed"],
                                      progress=self.progress)
                result["eval"] = evaluate(OnnxModule(tmp / ONNX_FILE), self.eval_loader, reference=self.reference(),
                                          progress=self.progress).to_dict()
            except QuantizationError as e:
                quant = e.report
                result["status"] = (f"rejected: int8 agrees with fp32 on {quant.agreement:.2f}% of held-out images, "
                                    f"below {min_agreement:g}%")
            result.update(quantization=quant.to_dict(), seconds=time.perf_counter() - start, settings=self.settings)
            (tmp / RESULT_FILE).write_text(json_text(result))
        return result
