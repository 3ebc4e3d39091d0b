"""How much accuracy each approximate rewrite costs, and how much calibration and fine-tuning win back.

    python benchmarks/bench_recovery.py                       # all four rewrites, full CIFAR-10 test set
    python benchmarks/bench_recovery.py --finetune-images 20000 --rewrites v1.5:v1

For each rewrite of the committed CIFAR-10 models (v1 -> plain v1.5, v1.5 -> v1, v1.5 -> d, v1 -> d):
top-1 on the full test set of the original; after the naive weight copy; after BatchNorm re-estimation;
after the least-squares conv refit ("transfer", the previous calibration); after block reconstruction (the
default calibration: BatchNorm, then every rewritten block trained to reproduce the original block's output);
all on --calib-images unlabelled training images; after feature mimicking (--feature-steps steps matching the
original's pre-pool features on the same unlabelled images, with augmentation); and after one epoch on
--finetune-images labelled training images. The agreement with the original at each step; the images and
CPU time each step used. Goals: calibration within 1.0 point of the original, feature mimicking within 0.5,
one epoch within 0.3. Writes benchmarks/results/recovery.json, recovery.md (the table) and recovery.png.
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
from resnet_surgery.engine.rewrite import convert
from resnet_surgery.history import history
from resnet_surgery.recovery.calibrate import calibrate
from resnet_surgery.recovery.evaluate import evaluate, predict
from resnet_surgery.recovery.finetune import finetune
from resnet_surgery.recovery.reconstruct import RECONSTRUCT_ITERATIONS
from resnet_surgery.zoo.cifar import load_cifar_resnet

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
REWRITES = ("v1:v1.5", "v1.5:v1", "v1.5:d", "v1:d")
STEPS = ("original", "naive copy", "bn", "transfer", "reconstruct", "features", "finetune")
LABELS = ("original", "naive copy", "+ BN re-est.", "BN + conv refit", "BN + block recon.", "+ feature mimic.",
          "+ 1 epoch")
GOALS = {"reconstruct": 1.0, "features": 0.5, "finetune": 0.3}  # top-1 points below the original


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

    # The previous calibration (BatchNorm, then least-squares conv refits), for comparison.
    refit = calibrate(converted, original, calib, num_images=None, steps=("bn", "transfer"), batch_size=128,
                      seed=args.seed, progress=False)
    calibrated = calibrate(converted, original, calib, num_images=None, steps=("bn", "reconstruct"), batch_size=128,
                           seed=args.seed, progress=False,
                           **({} if args.iterations is None else {"iterations": args.iterations}))
    steps = {s.step: s for m in (refit, calibrated) for s in history(m).calibration.steps}
    for name, model in (("bn", None), ("transfer", refit), ("reconstruct", calibrated)):
        s = steps[name]
        if model is None:  # BatchNorm re-estimation alone: the same first step of both calibrations
            model = calibrate(converted, original, calib, num_images=None, steps=("bn",), batch_size=128,
                              progress=False)
        cpu, wall = s.cpu_seconds, s.wall_seconds
        if name != "bn":
            cpu, wall = cpu + steps["bn"].cpu_seconds, wall + steps["bn"].wall_seconds  # the whole calibration
        rows.append(row(name, ev(model), s.images, cpu, wall))
        print(f"  {name}: {rows[-1]['top1']:.2f} ({cpu:.1f} CPU s)", flush=True)

    mimicked = finetune(calibrated, original, calib, objective="features", steps=args.feature_steps, augment="cifar",
                        lr=args.feature_lr, batch_size=args.batch_size, bf16=args.bf16, seed=args.seed,
                        progress=sys.stderr.isatty())
    fm = history(mimicked).finetune
    rows.append(row("features", ev(mimicked), len(calib), fm.cpu_seconds, fm.wall_seconds))
    print(f"  features: {rows[-1]['top1']:.2f} ({fm.steps} steps, {fm.cpu_seconds:.0f} CPU s)", flush=True)

    tuned = finetune(mimicked, original, train, objective=args.objective, epochs=1, lr=args.lr,
                     batch_size=args.batch_size, alpha=args.alpha, augment="cifar", bf16=args.bf16, seed=args.seed,
                     progress=sys.stderr.isatty())
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
        "goals_met": {step: gap[step] <= goal for step, goal in GOALS.items()},
        "fits": [f.__dict__ for f in history(refit).calibration.fits],
        "blocks": [b.__dict__ for b in history(calibrated).calibration.blocks],
        "feature_loss": {"start": fm.loss_start, "end": fm.loss_end},
        "finetune_loss": {"start": ft.loss_start, "end": ft.loss_end},
    }


def markdown(result: dict) -> str:
    lines = [
        f"Recovery on the CIFAR-10 test set ({result['test_images']} images). Calibration and feature mimicking use "
        f"the same {result['calibration_images']} unlabelled training images; the last step is 1 epoch on "
        f"{result['finetune_images']} labelled training images. CPU seconds on {result['threads']} threads "
        "(calibration rows: the whole calibration, BatchNorm step included).",
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
    lines += ["", "Goals (points below the original's top-1): " +
              ", ".join(f"{step} {goal}" for step, goal in GOALS.items()) + ".", ""]
    for r in result["rewrites"]:
        verdicts = [f"{step} {'met' if r['goals_met'][step] else '**NOT MET**'} ({-r['gap_points'][step]:+.2f})"
                    for step in GOALS]
        lines.append(f"- {r['rewrite']}: " + "; ".join(verdicts))
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.6))
    for r in result["rewrites"]:
        ax.plot(range(len(STEPS)), [s["top1"] for s in r["steps"]], marker="o", label=r["rewrite"])
    ax.set_xticks(range(len(STEPS)), LABELS, rotation=20, ha="right")
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
    p.add_argument("--iterations", type=int, default=None, help="block reconstruction steps per block (default: calibrate's)")
    p.add_argument("--feature-steps", type=int, default=2000, help="feature mimicking steps on the calibration images")
    p.add_argument("--feature-lr", type=float, default=None, help="feature mimicking learning rate (default: finetune's)")
    p.add_argument("--objective", default="both", choices=("logits", "features", "both"),
                   help="objective of the one-epoch fine-tuning")
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
        # Written after every rewrite, so a run cut short keeps what it finished.
        write(args, {
            "benchmark": "recovery", "dataset": "CIFAR-10 JPEG (../shared/data/cifar10)",
            "test_images": len(test), "calibration_images": len(calib), "finetune_images": len(train),
            "reconstruct": {"iterations_per_block": args.iterations or RECONSTRUCT_ITERATIONS, "previous": True},
            "features": {"steps": args.feature_steps, "lr": args.feature_lr, "augment": "cifar", "bf16": args.bf16},
            "finetune": {"epochs": 1, "objective": args.objective, "lr": args.lr, "alpha": args.alpha,
                         "batch_size": args.batch_size, "bf16": args.bf16, "augment": "cifar"},
            "goals_points": GOALS,
            "threads": args.threads, "torch": torch.__version__, "platform": platform.platform(),
            "wall_seconds": round(time.time() - start, 1), "rewrites": runs,
        })


def write(args, result: dict) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out, force=True) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    with atomic_file(args.out.with_suffix(".md"), force=True) as tmp:
        tmp.write_text(table)
    plot(result, args.out.with_suffix(".png"))
    print(table)
    print(f"written: {args.out}, {args.out.with_suffix('.md')}, {args.out.with_suffix('.png')}", flush=True)

if __name__ == "__main__":
    main()
