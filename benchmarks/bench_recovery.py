"""How much accuracy each approximate rewrite costs, and how much calibration and fine-tuning win back.

    python benchmarks/bench_recovery.py                       # all four rewrites, full CIFAR-10 test set
    python benchmarks/bench_recovery.py --finetune-images 20000 --rewrites v1.5:v1

For each rewrite of the committed CIFAR-10 models (v1 -> plain v1.5, v1.5 -> v1, v1.5 -> d, v1 -> d):
top-1 on the full test set of the original, after the naive weight copy, after BatchNorm re-estimation,
after data-aware weight transfer (both on --calib-images unlabelled training images), and after one epoch
of distillation on --finetune-images training images; the agreement with the original at each step; the
images and CPU time each step used. Goals: calibration within 1.0 point of the original, fine-tuning within
0.3. Writes benchmarks/results/recovery.json, recovery.md (the table) and recovery.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from resnet_surgery.atomic import atomic_file
from resnet_surgery.data import cifar10_tensors, normalize_uint8
from resnet_surgery.finetune import finetune
from resnet_surgery.history import history
from resnet_surgery.recovery import calibrate, evaluate, predict
from resnet_surgery.rewrite import convert
from resnet_surgery.zoo import load_cifar_resnet

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
REWRITES = ("v1:v1.5", "v1.5:v1", "v1.5:d", "v1:d")
STEPS = ("original", "naive copy", "bn", "transfer", "finetune")
CALIBRATION_GOAL, FINETUNE_GOAL = 1.0, 0.3  # top-1 points below the original


def subset(images, labels, n: int | None, seed: int):
    if n is None or n >= len(images):
        return images, labels
    keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return images[keep], labels[keep]


def row(step: str, report, images: int = 0, cpu: float = 0.0, wall: float = 0.0) -> dict:
    return {"step": step, "top1": report.top1, "top5": report.top5, "agreement": report.agreement, "kl": report.kl,
            "images": images, "cpu_seconds": round(cpu, 2), "wall_seconds": round(wall, 2)}


def run_rewrite(source: str, to: str, args, test, calib, train) -> dict:
    original = load_cifar_resnet(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert(original, to, input_size=(3, 32, 32))
    reference = predict(original, test, batch_size=500, progress=False)  # the original's logits, computed once
    ev = lambda m, ref=reference: evaluate(m, test, reference=ref, batch_size=500, progress=False)  # noqa: E731
    rows = [row("original", ev(original, None)), row("naive copy", ev(converted))]
    print(f"{source} -> {to}: original {rows[0]['top1']:.2f}, naive copy {rows[1]['top1']:.2f}", flush=True)

    bn_only = calibrate(converted, original, calib, num_images=None, steps=("bn",), batch_size=128, progress=False)
    calibrated = calibrate(converted, original, calib, num_images=None, batch_size=128, progress=False)
    steps = {s.step: s for s in history(calibrated).calibration.steps}
    for name, model in (("bn", bn_only), ("transfer", calibrated)):
        s = steps[name]
        rows.append(row(name, ev(model), s.images, s.cpu_seconds, s.wall_seconds))
        print(f"  {name}: {rows[-1]['top1']:.2f} ({s.cpu_seconds:.1f} CPU s)", flush=True)

    tuned = finetune(calibrated, original, train, epochs=1, lr=args.lr, batch_size=args.batch_size, alpha=args.alpha,
                     bf16=args.bf16, seed=args.seed, progress=sys.stderr.isatty())
    ft = history(tuned).finetune
    rows.append(row("finetune", ev(tuned), ft.images, ft.cpu_seconds, ft.wall_seconds))
    print(f"  finetune: {rows[-1]['top1']:.2f} ({ft.images} images, {ft.cpu_seconds:.0f} CPU s)", flush=True)

    base = rows[0]["top1"]
    gap = {r["step"]: round(base - r["top1"], 2) for r in rows}
    return {
        "rewrite": f"{source} -> {to}" + (" (plain)" if to == "v1.5" else ""),
        "source": source, "to": to,
        "ops": sorted({r.op for r in history(converted).recipe.rewrites}),
        "steps": rows,
        "gap_points": gap,
        "calibration_goal_met": gap["transfer"] <= CALIBRATION_GOAL,
        "finetune_goal_met": gap["finetune"] <= FINETUNE_GOAL,
        "fits": [f.__dict__ for f in history(calibrated).calibration.fits],
        "finetune_loss": {"start": ft.loss_start, "end": ft.loss_end},
    }


def markdown(result: dict) -> str:
    lines = [
        f"Recovery on the CIFAR-10 test set ({result['test_images']} images); calibration on "
        f"{result['calibration_images']} unlabelled training images, fine-tuning 1 epoch of distillation on "
        f"{result['finetune_images']} training images; CPU seconds on {result['threads']} threads.",
        "",
        "| rewrite | step | top-1 % | vs original | agreement % | KL | images | CPU s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rewrites"]:
        base = r["steps"][0]["top1"]
        for s in r["steps"]:
            delta = f"{s['top1'] - base:+.2f}" if s["step"] != "original" else ""
            agree = f"{s['agreement']:.2f}" if s["agreement"] is not None else ""
            kl = f"{s['kl']:.4f}" if s["kl"] is not None else ""
            lines.append(f"| {r['rewrite']} | {s['step']} | {s['top1']:.2f} | {delta} | {agree} | {kl} | "
                         f"{s['images']} | {s['cpu_seconds']:.1f} |")
    lines += ["", f"Goals: calibration within {CALIBRATION_GOAL} point, fine-tuning within {FINETUNE_GOAL} point "
                  "of the original's top-1.", ""]
    for r in result["rewrites"]:
        cal = "met" if r["calibration_goal_met"] else "**NOT MET**"
        ft = "met" if r["finetune_goal_met"] else "**NOT MET**"
        lines.append(f"- {r['rewrite']}: calibration goal {cal} ({-r['gap_points']['transfer']:+.2f} points), "
                     f"fine-tuning goal {ft} ({-r['gap_points']['finetune']:+.2f} points)")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in result["rewrites"]:
        ax.plot(range(len(STEPS)), [s["top1"] for s in r["steps"]], marker="o", label=r["rewrite"])
    ax.set_xticks(range(len(STEPS)), ["original", "naive copy", "+ BN re-est.", "+ weight transfer", "+ fine-tune"])
    ax.set_ylabel("CIFAR-10 test top-1 (%)")
    ax.set_title("Accuracy after each recovery step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path, force=True) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rewrites", nargs="+", default=list(REWRITES), choices=REWRITES, help="source:target pairs")
    p.add_argument("--calib-images", type=int, default=2048, help="unlabelled training images for calibration")
    p.add_argument("--finetune-images", type=int, default=50000,
                   help="training images in the one fine-tuning epoch (the budget knob: about 2 CPU ms each)")
    p.add_argument("--test-images", type=int, default=None, help="evaluate on a subset (default: all 10,000)")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (default: finetune's)")
    p.add_argument("--alpha", type=float, default=0.9, help="distillation weight against cross-entropy")
    p.add_argument("--batch-size", type=int, default=64, help="fine-tuning batch size")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="fine-tune in float32 (about 2x slower)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=SHARED, help="shared data folder holding cifar10/{train,test}.tar")
    p.add_argument("--out", type=Path, default=RESULTS / "recovery.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    test_images, test_labels = subset(*cifar10_tensors(args.data, "test"), args.test_images, args.seed)
    train_images, train_labels = cifar10_tensors(args.data, "train")
    calib_images, _ = subset(train_images, train_labels, args.calib_images, args.seed)
    ft_images, ft_labels = subset(train_images, train_labels, args.finetune_images, args.seed + 1)
    test = TensorDataset(normalize_uint8(test_images), test_labels)
    calib = TensorDataset(normalize_uint8(calib_images))  # no labels: calibration does not use them
    train = TensorDataset(normalize_uint8(ft_images), ft_labels)

    start = time.time()
    runs = []
    for pair in args.rewrites:
        source, to = pair.split(":")
        runs.append(run_rewrite(source, to, args, test, calib, train))
    result = {
        "benchmark": "recovery", "dataset": "CIFAR-10 JPEG (../shared/data/cifar10)",
        "test_images": len(test), "calibration_images": len(calib), "finetune_images": len(train),
        "finetune": {"epochs": 1, "lr": args.lr, "alpha": args.alpha, "batch_size": args.batch_size, "bf16": args.bf16},
        "goals_points": {"calibration": CALIBRATION_GOAL, "finetune": FINETUNE_GOAL},
        "threads": args.threads, "torch": torch.__version__, "platform": platform.platform(),
        "wall_seconds": round(time.time() - start, 1), "rewrites": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out, force=True) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    with atomic_file(args.out.with_suffix(".md"), force=True) as tmp:
        tmp.write_text(table)
    plot(result, args.out.with_suffix(".png"))
    print(table)
    print(f"written: {args.out}, {args.out.with_suffix('.md')}, {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
