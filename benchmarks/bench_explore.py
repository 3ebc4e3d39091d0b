"""Which variant to deploy, measured: `explore` on the committed CIFAR-10 models and on ResNet-50, and the int8 goals.

    python benchmarks/bench_explore.py                        # every part (about 40 minutes on 2 cores)
    python benchmarks/bench_explore.py --parts int8           # only the int8 goals (about 8 minutes)
    python benchmarks/bench_explore.py --smoke                # a tiny run that proves the script works (2 minutes)

Parts:
- ``cifar``: `explore` on cifar10-resnet-v1 and cifar10-resnet-v1.5 (calibration and int8 calibration on
  training images, evaluation on the full labelled test set, no fine-tuning); goals: under 15 minutes each,
  and at least one candidate faster than the original (upper end of the 95% interval below 1) with top-1
  within 1.0 point of it.
- ``resnet50``: `explore` on torchvision resnet50 with random weights at 224x224, batch 1 and 8, for
  latency only (random weights and random images: the accuracy columns mean nothing, int8 is kept whatever
  its agreement; calibration is BN re-estimation alone, as block reconstruction would only cost time here).
- ``int8``: top-1 of int8 against fp32 on the full CIFAR-10 test set for both models (goal: within 0.5
  point), and the ResNet-50 int8/fp32 median latency ratio at batch 1 and 8 in one interleaved run (goal:
  at most 0.35), with the CPU's vector ISA (avx512_vnni, amx, ...).

Writes benchmarks/results/explore-<model>.json and .png, int8.json and explore.md (the goals);
``--smoke`` writes under runs/bench_explore_smoke/ instead, never into benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from resnet_surgery.atomic import atomic_file
from resnet_surgery.data import cifar10_tensors, normalize_uint8
from resnet_surgery.deploy.export import export_onnx
from resnet_surgery.deploy.latency import compare_latency
from resnet_surgery.deploy.quantize import quantize_onnx
from resnet_surgery.store import load_model
from resnet_surgery.workflows.explore import explore
from resnet_surgery.zoo.cifar import load_cifar_resnet

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
PARTS = ("cifar", "resnet50", "int8")
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
INT8_TOP1_GOAL, INT8_RATIO_GOAL = 0.5, 0.35  # points below fp32; int8/fp32 median latency
EXPLORE_MINUTES_GOAL, FASTER_TOP1_GOAL = 15, 1.0


def cpu_isa() -> dict:
    """The CPU model and which int8/bf16-relevant vector extensions /proc/cpuinfo lists."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor())
    return {"cpu": model, **{f: f in flags for f in ISA_FLAGS}}


def cifar_sets(args):
    """(training images without labels, labelled test set), normalised tensors."""
    train, _ = cifar10_tensors(args.data, "train")
    test, labels = cifar10_tensors(args.data, "test")
    keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.train_images]
    n = args.test_images or len(test)
    return TensorDataset(normalize_uint8(train[keep])), TensorDataset(normalize_uint8(test[:n]), labels[:n])


def faster_within(report, points: float) -> list[str]:
    """Candidates significantly faster than the original (at every batch) with top-1 within ``points`` of it."""
    timed = report.timed()
    base = next(c for c in timed if c.name == "original").eval[report.metric]
    return [c.name for c in timed if c.eval[report.metric] >= base - points
            and all(lat["ratio_high"] < 1 for lat in c.latency.values())]


def run_cifar(args, results: Path) -> list[dict]:
    train, test = cifar_sets(args)
    rows = []
    for name in ("cifar10-resnet-v1", "cifar10-resnet-v1.5"):
        print(f"explore {name} ...", flush=True)
        report = explore(load_model(name, "DEFAULT"), train, eval_data=test, input_size=(3, 32, 32),
                         calibrate_images=args.calibrate_images, quant_images=args.quant_images,
                         batch_sizes=args.batch, threads=args.threads, min_time_s=args.min_time,
                         out=args.runs / name, force=not args.resume, batch_size=256, progress=args.progress)
        print(report, flush=True)
        save_report(report, results / f"explore-{name}")
        faster = faster_within(report, FASTER_TOP1_GOAL)
        # Candidates reused by --resume count at the build time they were recorded with.
        seconds = report.work_seconds()
        rows.append({"model": name, "seconds": round(seconds, 1), "this_run_seconds": round(report.seconds, 1),
                     "faster_within_1_point": faster, "time_goal_met": seconds < 60 * EXPLORE_MINUTES_GOAL,
                     "chart_goal_met": bool(faster)})
    return rows


def run_resnet50(args, results: Path) -> dict:
    g = torch.Generator().manual_seed(0)
    images = TensorDataset(torch.randn(args.r50_images, 3, args.r50_size, args.r50_size, generator=g))
    print("explore resnet50 (random weights, latency only) ...", flush=True)
    report = explore(load_model("resnet50", "none"), images, input_size=(3, args.r50_size, args.r50_size),
                     calibrate_images=args.r50_images // 2, stages=("bn",), eval_images=args.r50_images // 4,
                     quant_images=args.r50_images // 2, min_agreement=0, batch_sizes=args.r50_batch,
                     threads=args.threads,
                     min_time_s=args.min_time, out=args.runs / "resnet50", force=not args.resume, batch_size=16,
                     progress=args.progress)
    print(report, flush=True)
    save_report(report, results / "explore-resnet50")
    return {"model": "resnet50", "seconds": round(report.seconds, 1)}


def _microseconds(x):
    """Raw timings rounded to 0.1 us, one compact line per list: the file stays small enough to commit."""
    if isinstance(x, dict):
        return {k: _microseconds(v) for k, v in x.items()}
    if isinstance(x, list) and x and all(isinstance(v, float) for v in x):
        return json.dumps([round(v, 7) for v in x])
    return x


def save_report(report, stem: Path) -> None:
    data = report.to_dict()
    data["latency"]["timings_s"] = _microseconds(data["latency"]["timings_s"])
    text = json.dumps(data, indent=2, default=str)
    # The raw timing lists were dumped as strings: unquote them back into JSON arrays.
    text = re.sub(r'"(\[[-0-9.e, ]*\])"', r"\1", text)
    # Not with_suffix: "cifar10-resnet-v1.5" would lose its ".5".
    with atomic_file(stem.parent / f"{stem.name}.json", force=True) as tmp:
        tmp.write_text(text + "\n")
    report.plot(stem.parent / f"{stem.name}.png")


def run_int8(args) -> dict:
    train, test = cifar_sets(args)
    cifar = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for layout in ("v1", "v1.5"):
            fp32 = work / f"cifar-{layout}.onnx"
            export_onnx(load_cifar_resnet(layout), fp32, input_size=(3, 32, 32))
            q = quantize_onnx(fp32, work / f"cifar-{layout}.int8.onnx", train, num_images=args.quant_images,
                              parity_data=test, parity_images=len(test), min_agreement=0, batch_size=256,
                              progress=args.progress)
            gap = q.top1_fp32 - q.top1_int8
            cifar.append({"model": f"cifar10-resnet-{layout}", **q.to_dict(), "gap_points": round(gap, 2),
                          "goal_met": gap <= INT8_TOP1_GOAL})
            print(f"cifar10-resnet-{layout}: top-1 fp32 {q.top1_fp32:.2f}% int8 {q.top1_int8:.2f}% "
                  f"(agreement {q.agreement:.2f}%)", flush=True)

        g = torch.Generator().manual_seed(0)
        r50 = load_model("resnet50", "none")
        size = (3, args.r50_size, args.r50_size)
        export_onnx(r50, work / "r50.onnx", input_size=size)
        images = TensorDataset(torch.randn(2 * args.r50_images, *size, generator=g))
        quantize_onnx(work / "r50.onnx", work / "r50.int8.onnx", images, num_images=args.r50_images,
                      parity_images=args.r50_images, min_agreement=0, batch_size=16, progress=args.progress)
        latency = compare_latency({"fp32": work / "r50.onnx", "int8": work / "r50.int8.onnx"}, batch_sizes=args.r50_batch,
                                  threads=args.threads, min_time_s=args.min_time, progress=args.progress)
    print(latency, flush=True)
    ratios = {str(r["batch"]): {k: r[k] for k in ("ratio", "ratio_low", "ratio_high", "p50_ms")}
              for r in latency.results if r["model"] == "int8"}
    return {"cifar": cifar, "resnet50": {"ratios": ratios, "goal_met": all(r["ratio"] <= INT8_RATIO_GOAL
                                                                          for r in ratios.values()),
                                         "latency": latency.to_dict()}}


def markdown(result: dict) -> str:
    isa = result["isa"]
    lines = [f"{result['date']}, {isa['cpu']} (" + ", ".join(f for f in ISA_FLAGS if isa[f]) + f"), "
             f"onnxruntime {result['onnxruntime']}, torch {result['torch']}", ""]
    if "int8" in result:
        lines += ["| model | top-1 fp32 % | top-1 int8 % | agreement % | KL | goal (within 0.5 point) |",
                  "| --- | ---: | ---: | ---: | ---: | --- |"]
        lines += [f"| {c['model']} | {c['top1_fp32']:.2f} | {c['top1_int8']:.2f} | {c['agreement']:.2f} | "
                  f"{c['kl']:.4f} | {'met' if c['goal_met'] else '**NOT MET**'} |" for c in result["int8"]["cifar"]]
        lines += ["", f"| ResNet-50 int8 / fp32 ({result['settings']['r50_size']}x{result['settings']['r50_size']}) | median latency ratio [95% CI] | int8 p50 ms | goal (<= 0.35) |",
                  "| --- | ---: | ---: | --- |"]
        r50 = result["int8"]["resnet50"]
        lines += [f"| batch {b} | {r['ratio']:.3f} [{r['ratio_low']:.3f}, {r['ratio_high']:.3f}] | {r['p50_ms']:.2f} | "
                  f"{'met' if r['ratio'] <= INT8_RATIO_GOAL else '**NOT MET**'} |" for b, r in r50["ratios"].items()]
        lines.append("")
    for row in result.get("cifar", []):
        lines.append(f"- explore {row['model']}: {row['seconds'] / 60:.1f} minutes "
                     f"({'met' if row['time_goal_met'] else '**NOT MET**'}, goal under {EXPLORE_MINUTES_GOAL}); "
                     f"faster than the original with top-1 within {FASTER_TOP1_GOAL} point: "
                     f"{', '.join(row['faster_within_1_point']) or '**none**'}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts of {','.join(PARTS)}")
    p.add_argument("--smoke", action="store_true", help="a tiny, fast run into runs/bench_explore_smoke/")
    p.add_argument("--resume", action="store_true",
                   help="reuse finished explore candidates under --runs (their recorded build time counts)")
    p.add_argument("--calibrate-images", type=int, default=2048)
    p.add_argument("--quant-images", type=int, default=512)
    p.add_argument("--train-images", type=int, default=8192, help="training images to draw calibration images from")
    p.add_argument("--test-images", type=int, default=None, help="evaluate on the first N test images (default all)")
    p.add_argument("--r50-images", type=int, default=64, help="random images for ResNet-50 (calibration and checks)")
    p.add_argument("--batch", default="1,8", help="batch sizes timed for the CIFAR models")
    p.add_argument("--r50-batch", default="1,8", help="batch sizes timed for ResNet-50")
    p.add_argument("--r50-size", type=int, default=224, help="ResNet-50 input size")
    p.add_argument("--min-time", type=float, default=10.0, help="seconds of timing per batch size, at least")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data", type=Path, default=SHARED)
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "bench_explore", help="explore output folders")
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",")]
    if unknown := set(parts) - set(PARTS):
        p.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    args.batch = [int(b) for b in args.batch.split(",")]
    args.r50_batch = [int(b) for b in args.r50_batch.split(",")]
    args.progress = True
    results = RESULTS
    if args.smoke:
        args.calibrate_images, args.quant_images, args.train_images, args.test_images = 64, 32, 256, 128
        args.r50_images, args.r50_size, args.min_time, args.batch, args.r50_batch = 8, 64, 0.2, [1], [1]
        args.runs = REPO / "runs" / "bench_explore_smoke"
        results = args.runs / "results"
        shutil.rmtree(results, ignore_errors=True)
    results.mkdir(parents=True, exist_ok=True)

    import onnxruntime

    start = time.time()
    result = {"benchmark": "explore", "date": time.strftime("%Y-%m-%d"), "isa": cpu_isa(),
              "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "platform": platform.platform(),
              "smoke": args.smoke, "settings": {k: str(v) for k, v in vars(args).items()}}
    if "int8" in parts:
        result["int8"] = run_int8(args)
    if "cifar" in parts:
        result["cifar"] = run_cifar(args, results)
    if "resnet50" in parts:
        result["resnet50"] = run_resnet50(args, results)
    result["wall_seconds"] = round(time.time() - start, 1)
    with atomic_file(results / "explore-goals.json", force=True) as tmp:
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    table = markdown(result)
    with atomic_file(results / "explore.md", force=True) as tmp:
        tmp.write_text(table)
    print(table)
    print(f"written: {results}/ (explore-goals.json, explore.md, explore-<model>.json/.png)")


if __name__ == "__main__":
    main()
