"""int8 weights at 7 bits (reduce_range, the default) against 8: accuracy on CIFAR-10 and ResNet-50 latency.

    python benchmarks/bench_int8_range.py            # about 10 CPU-minutes on one thread

- CIFAR-10: both committed models exported, quantized with each weight range (512 calibration images from the
  training set, minmax, per channel, uint8 activations) and scored against fp32 on the full test set.
- ResNet-50 (random weights, 224x224, batch 1): fp32, int8 with 7-bit and 8-bit weights timed in one
  interleaved `compare_latency` run (paired ratios against fp32).
Every figure comes with the CPU's instruction-set extensions. Writes benchmarks/results/int8-reduce-range.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from resnet_surgery.atomic import atomic_file
from resnet_surgery.data import cifar10_tensors, normalize_uint8
from resnet_surgery.deploy.cpu import cpu_extensions
from resnet_surgery.deploy.export import export_onnx
from resnet_surgery.deploy.latency import compare_latency
from resnet_surgery.deploy.machine import cpu_model
from resnet_surgery.deploy.quantize import quantize_onnx
from resnet_surgery.store import load_model
from resnet_surgery.zoo.cifar import load_cifar_resnet

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"


def run_cifar(args, work: Path) -> list[dict]:
    train, _ = cifar10_tensors(args.data, "train")
    test, labels = cifar10_tensors(args.data, "test")
    keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.train_images]
    calib, held_out = TensorDataset(normalize_uint8(train[keep])), TensorDataset(normalize_uint8(test), labels)
    rows = []
    for layout in ("v1", "v1.5"):
        fp32 = work / f"cifar-{layout}.onnx"
        export_onnx(load_cifar_resnet(layout), fp32, input_size=(3, 32, 32))
        for reduce_range in (True, False):
            q = quantize_onnx(fp32, work / f"cifar-{layout}-{reduce_range}.int8.onnx", calib, num_images=512,
                              parity_data=held_out, parity_images=len(held_out), min_agreement=0, batch_size=250,
                              reduce_range=reduce_range, progress=False)
            rows.append({"model": f"cifar10-resnet-{layout}", "weights_bits": 7 if reduce_range else 8,
                         "top1_fp32": q.top1_fp32, "top1_int8": q.top1_int8, "agreement": q.agreement, "kl": q.kl,
                         "parity_images": q.parity_images, "cpu_extensions": q.cpu_extensions})
            print(rows[-1], flush=True)
    return rows


def run_resnet50(args, work: Path) -> dict:
    size = (3, 224, 224)
    export_onnx(load_model("resnet50", "none"), work / "r50.onnx", input_size=size)
    images = TensorDataset(torch.randn(2 * args.r50_images, *size, generator=torch.Generator().manual_seed(0)))
    files = {"fp32": work / "r50.onnx"}
    for name, reduce_range in (("int8-w7", True), ("int8-w8", False)):
        files[name] = work / f"r50-{name}.onnx"
        quantize_onnx(work / "r50.onnx", files[name], images, num_images=args.r50_images,
                      parity_images=args.r50_images, min_agreement=0, batch_size=16, reduce_range=reduce_range,
                      progress=False)
    latency = compare_latency(files, batch_sizes=[1], threads=args.threads, min_time_s=args.min_time, progress=False)
    print(latency, flush=True)
    ratios = {r["model"]: {k: r[k] for k in ("ratio", "ratio_low", "ratio_high", "p50_ms")}
              for r in latency.results}
    return {"threads": args.threads, "ratios": ratios, "machine": latency.machine}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="cifar,resnet50")
    p.add_argument("--train-images", type=int, default=8192)
    p.add_argument("--r50-images", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--min-time", type=float, default=10.0)
    p.add_argument("--data", type=Path, default=SHARED)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"benchmark": "int8-reduce-range", "date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(),
              "cpu_extensions": cpu_extensions()}
    with tempfile.TemporaryDirectory() as work:
        if "cifar" in args.parts:
            result["cifar"] = run_cifar(args, Path(work))
        if "resnet50" in args.parts:
            result["resnet50"] = run_resnet50(args, Path(work))
    out = RESULTS / "int8-reduce-range.json"
    with atomic_file(out, force=True) as tmp:
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
