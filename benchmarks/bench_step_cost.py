"""What one recovery step costs on the CPU: reconstruction iterations and feature-mimicking steps, in float32,
channels-last, bfloat16 autocast and both, on the CIFAR-10 models and on ResNet-50 at 224x224.

    python benchmarks/bench_step_cost.py cifar
    python benchmarks/bench_step_cost.py resnet50 --to v1 d

Reconstruction: `reconstruct_blocks` runs twice per setting on the same cached images, with --short and --long
iterations per block (one held-back check, at the end); CPU seconds per iteration per block is the difference
over the extra iterations, so caching and checks cancel. Feature mimicking: `finetune(objective="features")`
with --short and --long steps, differenced the same way. ResNet-50 has random weights with BatchNorm statistics
and affines randomised so its activations look like a trained network's (bench_recovery_guard.trained_like),
on random resized crops of the ImageNet validation photos in ../shared/data. The default `calibrate` on 1,024
images is then estimated from its parts: the passes over the images (measured on --images images and scaled)
plus 500 iterations per block; --calibrate runs it whole instead (`resnet50 --calibrate --images 1024`): process CPU
and wall seconds of the call, measuring passes included, each step's share from its report, and agreement with
the original on --test-images other crops. One JSON line per run goes to benchmarks/results/step-cost.jsonl, with the
CPU's flags (AVX-512 BF16 and AMX decide what bfloat16 is worth).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import resnet_surgery.recovery.reconstruct as reconstruct
from resnet_surgery.deploy.cpu import cpu_extensions
from resnet_surgery.engine.rewrite import convert
from resnet_surgery.history import history
from resnet_surgery.recovery.calibrate import approximate_rewrites, calibrate
from resnet_surgery.recovery.evaluate import evaluate, predict
from resnet_surgery.recovery.finetune import finetune
from resnet_surgery.store import load_model

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
OUT = REPO / "benchmarks" / "results" / "step-cost.jsonl"
SETTINGS = {"float32": (False, False), "channels_last": (False, True), "bf16": (True, False),
            "bf16+channels_last": (True, True)}


def setup(model: str, to: str, images: int):
    """(original, converted, calibration images) for one benchmark model."""
    if model == "cifar":
        from resnet_surgery.data import cifar10_tensors, normalize_uint8

        original = load_model("cifar10-resnet-v1.5", "DEFAULT").eval()
        train, _ = cifar10_tensors(SHARED, "train")
        calib = normalize_uint8(train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:images]])
        size = 32
    else:
        import torchvision
        from bench_recovery_guard import trained_like

        calib = imagenet_crops(images, seed=1)
        torch.manual_seed(0)
        original = trained_like(torchvision.models.resnet50(), calib[:32], 0)
        size = 224
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert(original, to, input_size=size)
    return original, converted, calib


def reconstruction_cost(original, converted, calib, bf16: bool, channels_last: bool, short: int, long: int,
                        batch_size: int) -> dict:
    """CPU seconds per reconstruction iteration, per block (the unit: the block before it and the block)."""
    blocks = list(dict.fromkeys(r.block for r in approximate_rewrites(converted)))
    loader = DataLoader(TensorDataset(calib), batch_size=64)
    batches = [(x, None) for (x,) in loader]
    runs = {}
    for n in (short, long):
        model = copy.deepcopy(converted)
        runs[n] = reconstruct.reconstruct_blocks(model, original, blocks, batches, iterations=n,
                                                 batch_size=batch_size, bf16=bf16, channels_last=channels_last,
                                                 progress=False)
    return {b.block: {"seconds_per_iteration": (b.cpu_seconds - a.cpu_seconds) / (long - short),
                      "cached_images": b.images, "fixed_seconds": a.cpu_seconds - short * (b.cpu_seconds - a.cpu_seconds) / (long - short)}
            for a, b in zip(runs[short], runs[long])}


def feature_cost(original, converted, calib, bf16: bool, channels_last: bool, short: int, long: int,
                 batch_size: int) -> float:
    """CPU seconds per feature-mimicking step (training time alone, the guard's measurements excluded)."""
    data = TensorDataset(calib)
    seconds = {}
    for n in (short, long):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a few steps may not improve the objective: that is not measured here
            model = finetune(converted, original, data, objective="features", steps=n, batch_size=batch_size,
                             bf16=bf16, channels_last=channels_last, progress=False)
        seconds[n] = history(model).finetune.cpu_seconds
    return (seconds[long] - seconds[short]) / (long - short)


def calibrate_passes(original, converted, calib) -> float:
    """CPU seconds of a default calibration on ``calib`` minus its iterations: one iteration per block."""
    start = time.process_time()
    calibrate(converted, original, TensorDataset(calib), num_images=None, iterations=1, progress=False)
    return time.process_time() - start


def full_calibration(original, converted, calib, test, bf16: bool, channels_last: bool, iterations: int) -> dict:
    """The default `calibrate` on every image of ``calib``, timed whole (process CPU and wall seconds, its
    measuring passes included), each step as its report gives it, and agreement with the original on ``test``."""
    cpu, wall = time.process_time(), time.perf_counter()
    model = calibrate(converted, original, TensorDataset(calib), num_images=None, bf16=bf16,
                      channels_last=channels_last, iterations=iterations, progress=False)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    report = history(model).calibration
    reference = predict(original, TensorDataset(test), batch_size=64, progress=False)
    held_out = {label: evaluate(m, TensorDataset(test), reference=reference, batch_size=64, progress=False).agreement
                for label, m in (("naive copy", converted), ("calibrated", model))}
    steps = [{"step": s.step, "cpu_seconds": round(s.cpu_seconds, 1), "wall_seconds": round(s.wall_seconds, 1),
              "agreement": s.agreement.agreement} for s in report.steps]
    blocks = [{"block": b.block, "previous": b.previous, "images": b.images, "iterations": b.iterations,
               "error_before": b.error_before,
               "error_after": b.error_after, "cpu_seconds": round(b.cpu_seconds, 1), "kept": b.kept}
              for b in report.blocks]
    print(report, flush=True)
    return {"cpu_seconds": round(cpu, 1), "cpu_minutes": round(cpu / 60, 1), "wall_seconds": round(wall, 1),
            "steps": steps, "blocks": blocks, "test_images": len(test), "agreement_held_out": held_out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=("cifar", "resnet50"))
    p.add_argument("--to", nargs="+", default=["v1"], choices=("v1", "d"))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--images", type=int, default=72, help="images cached for reconstruction (and fed to features)")
    p.add_argument("--short", type=int, default=2)
    p.add_argument("--long", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=reconstruct.RECONSTRUCT_BATCH)
    p.add_argument("--feature-batch", type=int, default=64)
    p.add_argument("--feature-short", type=int, default=2)
    p.add_argument("--feature-long", type=int, default=6)
    p.add_argument("--no-features", dest="features", action="store_false")
    p.add_argument("--passes", action="store_true", help="also time calibrate's passes over --images images")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calibrate", action="store_true",
                   help="run the whole default calibrate on --images images per setting instead (timed)")
    p.add_argument("--test-images", type=int, default=256, help="--calibrate: other crops for held-out agreement")
    p.add_argument("--iterations", type=int, default=None,
                   help="--calibrate: reconstruction iterations per block (default: calibrate's)")
    p.add_argument("--out", type=Path, default=OUT, help="JSON lines file to append to")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.calibrate:
        return calibrate_main(args)
    reconstruct.RECONSTRUCT_CHECKS = 1  # one held-back check per block, at the end: iterations are what is timed
    flags = cpu_extensions()
    for to in args.to:
        original, converted, calib = setup(args.model, to, args.images)
        result = {"model": args.model, "rewrite": f"v1.5 -> {to}", "images": len(calib), "threads": args.threads,
                  "batch_size": args.batch_size, "feature_batch": args.feature_batch, "cpu_flags": flags,
                  "torch": torch.__version__, "settings": {}}
        for name in args.settings:
            bf16, channels_last = SETTINGS[name]
            row = {"reconstruct": reconstruction_cost(original, converted, calib, bf16, channels_last, args.short,
                                                      args.long, args.batch_size)}
            if args.features:
                row["feature_step_seconds"] = feature_cost(original, converted, calib, bf16, channels_last,
                                                           args.feature_short, args.feature_long, args.feature_batch)
            result["settings"][name] = row
            print(to, name, json.dumps(row), flush=True)
        if args.passes:
            result["calibrate_passes_seconds"] = calibrate_passes(original, converted, calib)
        with args.out.open("a") as f:
            f.write(json.dumps(result) + "\n")


def calibrate_main(args) -> None:
    """--calibrate: the whole default calibration per rewrite and setting, one JSON line each."""
    for to in args.to:
        original, converted, calib = setup(args.model, to, args.images)
        test = held_out_images(args.model, args.test_images)
        for name in args.settings:
            bf16, channels_last = SETTINGS[name]
            row = full_calibration(original, converted, calib, test, bf16, channels_last, args.iterations)
            # calibrate's defaults: its iterations, channels-last, float32
            default = args.iterations is None and name == "channels_last"
            run = "default calibrate" if default else "calibrate"
            result = {"model": args.model, "rewrite": f"v1.5 -> {to}", "run": run, "setting": name,
                      "iterations_per_block": args.iterations,
                      "images": len(calib), "threads": args.threads, "cpu_flags": cpu_extensions(),
                      "torch": torch.__version__, **row}
            print(to, name, json.dumps(result), flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps(result) + "\n")


def held_out_images(model: str, n: int) -> torch.Tensor:
    """Held-out images: other crops of the same photos (ResNet-50), or CIFAR-10 test images."""
    if model == "cifar":
        from resnet_surgery.data import cifar10_tensors, normalize_uint8

        test, _ = cifar10_tensors(SHARED, "test")
        return normalize_uint8(test[:n])
    return imagenet_crops(n, seed=2)


def imagenet_crops(n: int, seed: int) -> torch.Tensor:
    """``n`` random resized 224 crops of the ImageNet validation photos in ../shared/data, as many of each."""
    from bench_recovery_guard import crops

    photos = sorted((SHARED / "imagenet-val").glob("*.JPEG"))
    return crops(photos, -(-n // len(photos)), seed=seed)[:n]


if __name__ == "__main__":
    main()
