"""What else could the default calibration do for v1.5 -> v1? Variants on the trained ResNet-50 (and CIFAR).

    python benchmarks/bench_calibration_variants.py

Each variant starts from the same conversion and calibrates on the same 2,048 training images; top-1 on the
whole CIFAR-10 test set, CPU seconds of the calibration on one thread:
- "default": `calibrate` as it is;
- "interpolated 3x3": a better weight transfer for the 3x3 that lost 3 of 4 positions. After v1.5 -> v1 it
  reads the strided 1x1's output at full-resolution offsets -2, 0, +2 where the original read -1, 0, +1;
  reading the feature at +1 as the mean of those at 0 and +2 (linear interpolation) gives the kernel
  K' = B^T K B per spatial axis, B = [[.5, .5, 0], [0, 1, 0], [0, .5, .5]] (rows: the original's taps, columns:
  the new ones). Exact on linear features;
- "1,500 iterations", "after=1", "after=3": more reconstruction, and units that also train the blocks after
  the rewritten one against the original's output after the last of them (BRECQ's larger units).
Writes benchmarks/results/calibration-variants.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from resnet_surgery.atomic import atomic_file
from resnet_surgery.data import cifar10_tensors, normalize_uint8
from resnet_surgery.deploy.cpu import cpu_extensions
from resnet_surgery.engine.rewrite import convert
from resnet_surgery.history import history
from resnet_surgery.recovery.calibrate import approximate_rewrites, calibrate
from resnet_surgery.recovery.evaluate import evaluate
from resnet_surgery.zoo.cifar import load_cifar_resnet
from resnet_surgery.zoo.judge import load_judge

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
OUT = REPO / "benchmarks" / "results" / "calibration-variants.json"
# Original taps (-1, 0, +1) -> new taps (-2, 0, +2 at full resolution): +-1 read as the mean of 0 and +-2.
B = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.5, 0.5]])


def interpolate_kernels(model: torch.nn.Module) -> torch.nn.Module:
    """The 3x3 of every block whose stride moved to its 1x1, its kernel interpolated (in place)."""
    for r in approximate_rewrites(model):
        conv = model.get_submodule(r.block).conv2
        with torch.no_grad():
            conv.weight.copy_(torch.einsum("ui,ocuv,vj->ocij", B, conv.weight, B))
    return model


# name -> (interpolate the 3x3, calibrate's options); the CIFAR model runs the first two only.
VARIANTS = {"default": (False, {}), "interpolated 3x3": (True, {}), "1,500 iterations": (False, {"iterations": 1500}),
            "after=1": (False, {"after": 1}), "after=3": (False, {"after": 3})}


def run(name: str, original, size: int, calib, test, variants: list[str]) -> dict:
    row = {"model": name, "original": evaluate(original, test, batch_size=500, progress=False).top1}
    for label in variants:
        interpolate, options = VARIANTS[label]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = convert(original, "v1", input_size=(3, size, size))
        if interpolate:
            interpolate_kernels(model)
        row[label] = {"naive": evaluate(model, test, batch_size=500, progress=False).top1}
        cpu = time.process_time()
        calibrated = calibrate(model, original, calib, num_images=None, batch_size=128, progress=False, **options)
        row[label]["calibrated"] = evaluate(calibrated, test, batch_size=500, progress=False).top1
        row[label]["calibration_cpu_s"] = round(time.process_time() - cpu, 1)
        row[label]["kept"] = [b.kept for b in history(calibrated).calibration.blocks]
        print(name, label, json.dumps(row[label]), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calib-images", type=int, default=2048)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train, _ = cifar10_tensors(SHARED, "train")
    test_images, test_labels = cifar10_tensors(SHARED, "test")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.calib_images]
    rows = []
    judge = load_judge()
    for name, original, size, variants in (("cifar10-resnet50", judge, judge.input_size, list(VARIANTS)),
                                           ("cifar10-resnet-v1.5", load_cifar_resnet("v1.5"), 32, list(VARIANTS)[:2])):
        prepare = lambda x, size=size: torch.nn.functional.interpolate(  # noqa: E731
            normalize_uint8(x), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        rows.append(run(name, original, size, TensorDataset(prepare(train[pick])),
                        TensorDataset(prepare(test_images), test_labels), variants))
    result = {"benchmark": "calibration-variants", "rewrite": "v1.5 -> v1", "test_images": len(test_images),
              "calibration_images": args.calib_images, "threads": args.threads, "cpu_flags": cpu_extensions(),
              "torch": torch.__version__, "platform": platform.platform(), "rows": rows}
    with atomic_file(OUT, force=True) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
