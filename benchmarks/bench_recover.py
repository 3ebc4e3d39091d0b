"""`recover` to a target within a budget against today's separate steps at the same CPU cost, on the CIFAR models.

    python benchmarks/bench_recover.py --part recover --rewrite v1.5:v1 --model cifar10-resnet50 --budget 383

``--model cifar10-resnet50`` runs it on the trained ResNet-50 stand-in (`train_resnet50.py`, its images upsampled
as it was trained); its results are named ``recover-resnet50-part-*.json`` and are not part of --combine.

    python benchmarks/bench_recover.py --part recover --rewrite v1.5:v1      # one process
    python benchmarks/bench_recover.py --part steps --rewrite v1.5:v1        # another (or after)
    python benchmarks/bench_recover.py --combine                             # results/recover.{json,md,png}

``--part recover`` runs `recover` on the CIFAR-10 training set (labelled; it holds --eval-images back to judge
its stages) with --target and --budget, then scores the model it returns on the full test set. ``--part steps``
runs the separate steps as `bench_cost.py` does (default calibration, then feature mimicking and fine-tuning
runs from the calibrated model, each budget a separate run) on the same machine and the same images recover
uses (its calibration subset; fine-tuning on the training set less recover's held-back images). ``--combine`` compares
recover's test top-1 with the best separate point whose CPU seconds are at most recover's (x 1.1), per rewrite.
One thread per process; run the parts one at a time, or two at once on a 2-core machine (each on one core).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from resnet_surgery.atomic import atomic_file
from resnet_surgery.data import cifar10_tensors, disjoint_subsets, held_out_split, normalize_uint8
from resnet_surgery.deploy.cpu import cpu_extensions
from resnet_surgery.engine.rewrite import convert
from resnet_surgery.history import history
from resnet_surgery.recovery.evaluate import evaluate
from resnet_surgery.recovery.recover import RecoverOptions, recover
from resnet_surgery.recovery.recover_report import RecoveryReport, RecoveryStage
from resnet_surgery.zoo.cifar import load_cifar_resnet
from resnet_surgery.zoo.judge import JUDGE_NAME, load_judge

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
SLACK = 1.1  # a separate point counts as "at the same cost" up to this multiple of recover's CPU seconds


def machine() -> dict:
    return {"cpu_flags": cpu_extensions(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def cifar_set(args, split: str, size: int = 32) -> TensorDataset:
    """A CIFAR-10 split as normalised images and labels, upsampled to `size` as bench_cost.py does."""
    from bench_cost import resized

    images, labels = cifar10_tensors(args.data, split)
    return TensorDataset(resized(normalize_uint8(images), size), labels)


def load_model(args, layout: str) -> tuple[torch.nn.Module, int]:
    """The original model and its input size: a committed CIFAR model, or the trained ResNet-50 (v1.5 only)."""
    if args.model == JUDGE_NAME:
        if layout != "v1.5":
            raise SystemExit(f"{JUDGE_NAME} was trained as v1.5; use --rewrite v1.5:<target>")
        model = load_judge()
        return model, model.input_size
    return load_cifar_resnet(layout), 32


def part_recover(args) -> dict:
    """recover on the training set, its model scored on the test set."""
    source, target = args.rewrite.split(":")
    original, size = load_model(args, source)
    converted = convert(original, target, input_size=(3, size, size), warn=False)
    train, test = cifar_set(args, "train", size), cifar_set(args, "test", size)
    options = RecoverOptions(eval_images=args.eval_images, calibrate_images=args.calib_images,
                             labels=not args.no_labels, bf16=args.bf16, seed=args.seed)
    cpu, wall = time.process_time(), time.perf_counter()
    model = recover(converted, original, train, target=args.target, budget=args.budget, options=options,
                    progress=False, echo=lambda line: print(line, flush=True))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    report = history(model).recovery
    base = evaluate(original, test, batch_size=500, progress=False).top1
    final = evaluate(model, test, batch_size=500, progress=False).top1
    return {"rewrite": args.rewrite, "model": args.model, "target": args.target, "budget_s": args.budget,
            "labels": not args.no_labels,
            "cpu_seconds": cpu, "wall_seconds": wall, "original_top1": base, "test_top1": final,
            "report": report.to_dict(), "table": str(report), "machine": machine()}


def part_steps(args) -> dict:
    """The separate steps, as bench_cost.py measures them, on this machine."""
    import bench_cost

    cost_args = bench_cost.parse(["--rewrites", args.rewrite, "--threads", str(args.threads),
                                  "--calib-images", str(args.calib_images), "--feature-steps",
                                  *map(str, args.feature_steps), "--finetune-fractions",
                                  *map(str, args.finetune_fractions), "--data", str(args.data),
                                  *([] if args.bf16 else ["--no-bf16", "--no-calib-bf16"])])
    data = bench_cost.load_data(cost_args)
    # The images recover itself uses (the training set less its held-back images; calibration on its seeded
    # subset of them), so that the comparison is of the methods, not of two draws of 2,048 images.
    work, _ = held_out_split(cifar_set(args, "train"), None, keep=None, hold=args.eval_images, seed=args.seed)
    calib = disjoint_subsets(work, [args.calib_images], args.seed)[0]
    data["calib"] = TensorDataset(torch.stack([calib[i][0] for i in range(len(calib))]))  # no labels
    data["train"] = work
    record = json.loads((RESULTS / "train_cifar.json").read_text())
    result = bench_cost.run_rewrite(args.rewrite, cost_args, data, record, lambda r: None)
    return {"rewrite": args.rewrite, "points": result["points"], "machine": machine()}


def combine(out: Path) -> dict:
    rows = []
    for path in sorted(RESULTS.glob("recover-part-recover-*.json")):
        rec = json.loads(path.read_text())
        steps_path = RESULTS / path.name.replace("part-recover", "part-steps")
        steps = json.loads(steps_path.read_text()) if steps_path.is_file() else None
        row = {"rewrite": rec["rewrite"], "recover": rec, "steps": steps}
        if steps:
            cheap = [p for p in steps["points"] if p["step"] not in ("original",) and
                     p["cpu_seconds"] <= SLACK * rec["cpu_seconds"]]
            best = max(cheap, key=lambda p: p["top1"]) if cheap else None
            row["best_separate"] = best
            row["at_least_as_good"] = best is None or rec["test_top1"] >= best["top1"] - 1e-9
        rows.append(row)
    result = {"slack": SLACK, "rows": rows}
    with atomic_file(out, force=True) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    with atomic_file(out.with_suffix(".md"), force=True) as tmp:
        tmp.write_text(markdown(result))
    for row in rows:  # the chart of each recover run: the gap on its held-back images after every stage
        report = dict(row["recover"]["report"])
        stages = [RecoveryStage(**s) for s in report.pop("stages")]
        name = row["rewrite"].replace(":", "-") + ("" if row["recover"]["labels"] else "-nolabels")
        RecoveryReport(**report, stages=stages).plot(out.with_name(f"recover-{name}.png"))
    return result


def markdown(result: dict) -> str:
    """The comparison as a table per rewrite."""
    lines = ["`recover` (one call, --target and --budget) against the separate steps at no more than "
             f"{result['slack']:g}x its CPU seconds, CIFAR-10 test set (10,000 images), one thread.", ""]
    for row in result["rows"]:
        rec = row["recover"]
        m = rec["machine"]
        lines += [f"### {row['rewrite'].replace(':', ' -> ')}" + ("" if rec["labels"] else " (no labels)"), "",
                  f"Machine: CPU flags {', '.join(m['cpu_flags'])}, torch {m['torch']}, {m['threads']} thread, "
                  f"{m['date']}. Original {rec['original_top1']:.2f}.", "",
                  "| run | top-1 % | vs original | CPU s |", "| --- | ---: | ---: | ---: |",
                  f"| recover (target {rec['target']:g}, budget {rec['budget_s']:g} s; stopped: "
                  f"{rec['report']['stopped']}) | {rec['test_top1']:.2f} | {rec['test_top1'] - rec['original_top1']:+.2f} "
                  f"| {rec['cpu_seconds']:.0f} |"]
        for p in (row["steps"] or {}).get("points", []):
            if p["step"] != "original":
                lines.append(f"| {p['step']} {p['budget']} | {p['top1']:.2f} | {p['top1'] - rec['original_top1']:+.2f} "
                             f"| {p['cpu_seconds']:.0f} |")
        best = row.get("best_separate")
        if best is not None:
            verdict = "at least as good" if row["at_least_as_good"] else "worse"
            lines += ["", f"Best separate point within {result['slack']:g}x recover's CPU: {best['step']} "
                          f"{best['budget']}, {best['top1']:.2f}: recover is {verdict}."]
        lines += ["", "Stages of recover (gap on its held-back training images):", "", "```", rec["table"], "```", ""]
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("recover", "steps"))
    p.add_argument("--combine", action="store_true")
    p.add_argument("--rewrite", default="v1.5:v1", help="source:target of the committed CIFAR models")
    p.add_argument("--target", type=float, default=0.3, help="top-1 points below the original")
    p.add_argument("--budget", type=float, default=900.0, help="wall seconds")
    p.add_argument("--no-labels", action="store_true", help="recover without labels (agreement)")
    p.add_argument("--eval-images", type=int, default=2000)
    p.add_argument("--calib-images", type=int, default=2048)
    p.add_argument("--feature-steps", type=int, nargs="*", default=[500, 1000])
    p.add_argument("--finetune-fractions", type=float, nargs="*", default=[0.25, 0.5])
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (AVX-512 BF16 machines)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=SHARED)
    p.add_argument("--model", default="cifar", choices=("cifar", JUDGE_NAME),
                   help="the committed CIFAR models, or the trained ResNet-50 stand-in")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.combine:
        print(json.dumps(combine(RESULTS / "recover.json"), indent=2)[:4000])
        return
    name = args.rewrite.replace(":", "-") + ("-nolabels" if args.no_labels else "")
    out = RESULTS / f"recover-part-{args.part}-{name}.json"
    if args.model == JUDGE_NAME:  # not part of --combine (whose tables are the CIFAR models')
        if args.part != "recover":
            raise SystemExit("--model cifar10-resnet50 runs --part recover (its separate steps: bench_cost.py)")
        out = RESULTS / f"recover-resnet50-{name}-budget{args.budget:g}.json"
    result = part_recover(args) if args.part == "recover" else part_steps(args)
    with atomic_file(out, force=True) as tmp:
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(result.get("table", ""), f"\nwritten: {out}")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
