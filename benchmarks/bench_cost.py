"""What recovery costs against training from scratch: top-1 against CPU seconds for each rewrite.

    python benchmarks/bench_cost.py                           # all four rewrites, full CIFAR-10 test set (~1 h)
    python benchmarks/bench_cost.py --rewrites v1.5:v1 --resume

For each rewrite of the committed CIFAR-10 models (v1 -> plain v1.5, v1.5 -> v1, v1.5 -> d, v1 -> d), the
top-1 on the test set of: the original; the naive weight copy (no compute); the default calibration (BatchNorm,
then block reconstruction) on --calib-images unlabelled training images; feature mimicking from the calibrated
model on the same images, one separate run (its own cosine schedule) per --feature-steps budget; fine-tuning
from the calibrated model on --finetune-images labelled training images (distillation + 0.1 cross-entropy), one
separate run per --finetune-fractions budget (a fraction of an epoch). Each point's compute is in CPU seconds
(calibration included in what follows it) and in percent of the compute that trained the target layout from
scratch, whose curve is read from benchmarks/results/train_cifar.json (wall seconds x threads; the d layout was
never trained from scratch, so the v1.5 curve stands in for it). Headline per rewrite: the least compute at which
a measured point comes within 0.3 point of the original, and at which it matches it; goal: within 0.3 point at
<= 10% of from-scratch compute. Writes benchmarks/results/cost.json, cost.md and cost.png after every rewrite;
--resume reuses the finished rewrites of an existing cost.json measured with the same settings.

    python benchmarks/bench_cost.py --model cifar10-resnet50    # the trained ResNet-50 (v1.5): -> v1, -> d, -> v1 -> v1.5

--model cifar10-resnet50 judges the same steps on the ResNet-50 of benchmarks/train_resnet50.py (weights/), at
the size it was trained at, against its own recorded training (process CPU seconds per epoch); only its v1.5
layout was trained from scratch, so that curve stands in for every target. Writes results/cost-resnet50.*.
"""

from __future__ import annotations

import argparse
import json
import math
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
from resnet_surgery.recovery.calibrate import calibrate
from resnet_surgery.recovery.evaluate import evaluate, predict
from resnet_surgery.recovery.finetune import finetune
from resnet_surgery.zoo.cifar import load_cifar_resnet
from resnet_surgery.zoo.judge import JUDGE_NAME, load_judge

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
REWRITES = ("v1:v1.5", "v1.5:v1", "v1.5:d", "v1:d")
# The last: there and back (v1 calibrated, then converted back to v1.5 and recovered; the first leg's CPU is
# recorded apart, not in the points).
JUDGE_REWRITES = ("v1.5:v1", "v1.5:d", "v1.5:v1:v1.5")
SCRATCH_LAYOUT = {"v1.5": "v1.5", "v1": "v1", "d": "v1.5"}  # target -> the layout whose from-scratch curve counts
TOLERANCE = 0.3  # top-1 points below the original that count as "within"
GOAL_PERCENT = 10.0  # of the from-scratch compute
CALIB_BATCH = 128
BATCH = 64
ALPHA = 0.9
SERIES = (("bn", "v", "BatchNorm only"), ("calibration", "s", "calibration"), ("features", "o-", "feature mimicking (steps)"),
          ("finetune", "^-", "fine-tuning (epochs)"))
LABELLED = ("features", "finetune")  # the series whose points carry their budget


def subset(images, labels, n: int | None, seed: int):
    if n is None or n >= len(images):
        return images, labels
    keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return images[keep], labels[keep]


def scratch_curve(train: dict, target: str) -> dict:
    """The from-scratch training curve that ``target`` is compared with, in cumulative CPU seconds.

    Each cycle of train_cifar restarts its clock (elapsed_s) and ran at its own thread count, so the curve adds
    the finished cycles' wall_s and counts CPU seconds as wall seconds x threads (an upper bound: it assumes
    every thread busy the whole time).
    """
    layout = SCRATCH_LAYOUT[target]
    run = train["runs"][layout]
    points, before_cpu, before_epochs = [], 0.0, 0
    for c, cycle in enumerate(run["cycles"]):
        threads = (cycle.get("hyper_parameters") or {}).get("threads") or train.get("threads") or 1
        for h in cycle["history"]:
            points.append({"cycle": c + 1, "epoch": before_epochs + h["epoch"], "top1": h["test_top1"],
                           "cpu_seconds": round(before_cpu + h["elapsed_s"] * threads, 1)})
        before_cpu += cycle["wall_s"] * threads
        before_epochs += cycle["epochs"]
    total = round(before_cpu, 1)
    for p in points:
        p["percent"] = 100.0 * p["cpu_seconds"] / total
    return {"layout": layout, "stand_in": layout != target, "cpu_seconds": total, "epochs": before_epochs,
            "top1": run["test_top1"], "points": points}


def judge_scratch(record: dict, target: str) -> dict:
    """`scratch_curve` for train_resnet50.py's record: one cycle, process CPU seconds per epoch as measured."""
    total = record["cpu_s"]
    points = [{"cycle": 1, "epoch": h["epoch"], "top1": h["test_top1"], "cpu_seconds": h["cpu_s"],
               "percent": 100.0 * h["cpu_s"] / total} for h in record["history"]]
    return {"layout": "v1.5", "stand_in": target != "v1.5", "cpu_seconds": total, "epochs": record["epochs_done"],
            "top1": record["test_top1"], "points": points}


def first_reaching(points: list[dict], threshold: float) -> dict | None:
    """The cheapest point whose top-1 is at least ``threshold`` (rounded to the reported 0.01)."""
    good = [p for p in points if round(p["top1"] - threshold, 6) >= 0]
    return min(good, key=lambda p: p["cpu_seconds"]) if good else None


def headline(points: list[dict], original: float, scratch: dict) -> dict:
    """Where the measured points (everything but the original) reach the original's top-1, and the goal.

    Args:
        points: dicts with step, budget, top1, cpu_seconds and percent.
        original: the original's top-1.
        scratch: `scratch_curve`'s result, for when training from scratch itself gets within the tolerance.
    """
    measured = [p for p in points if p["step"] != "original"]
    brief = lambda p: None if p is None else {k: p[k] for k in ("step", "budget", "top1", "cpu_seconds", "percent")}  # noqa: E731
    within, match = first_reaching(measured, original - TOLERANCE), first_reaching(measured, original)
    cheap = [p for p in measured if p["percent"] <= GOAL_PERCENT]
    best = max(cheap, key=lambda p: (p["top1"], -p["cpu_seconds"])) if cheap else None
    met = within is not None and within["percent"] <= GOAL_PERCENT
    return {
        "within": brief(within), "match": brief(match),
        "scratch_within": brief(first_reaching([{**p, "step": "from scratch", "budget": f"epoch {p['epoch']}"}
                                                for p in scratch["points"]], original - TOLERANCE)),
        "goal": {"met": met, "best_within_goal": brief(best),
                 # how far the best point inside the budget falls short of the tolerance (0 when met)
                 "short_by_points": 0.0 if met or best is None else round(original - TOLERANCE - best["top1"], 2),
                 "within_at_percent": None if within is None else within["percent"]},
    }


def point(step: str, budget: str, report, original: float, cpu: float, scratch_cpu: float, **extra) -> dict:
    return {"step": step, "budget": budget, "top1": report.top1, "agreement": report.agreement,
            "vs_original": round(report.top1 - original, 2),
            "cpu_seconds": round(cpu, 1), "percent": 100.0 * cpu / scratch_cpu, **extra}


def timed(fn, *a, **kw):
    cpu = time.process_time()
    out = fn(*a, **kw)
    return out, time.process_time() - cpu


def recovery_runs(args, data: dict) -> list[tuple[str, object, int, str]]:
    """(step, dataset, optimiser steps, budget text) of every feature mimicking and fine-tuning run."""
    runs = [("features", data["calib"], steps, f"{steps} steps") for steps in args.feature_steps]
    for f in args.finetune_fractions:
        steps = max(1, round(f * len(data["train"]) / BATCH))
        runs.append(("finetune", data["train"], steps, f"{f:g} epoch ({steps} steps)"))
    return runs


def run_rewrite(pair: str, args, data: dict, train_record: dict, on_progress) -> dict:
    """Every point of one rewrite; ``on_progress(partial result)`` after each training run."""
    source, *chain = pair.split(":")
    to = chain[-1]
    judge = args.model == JUDGE_NAME
    scratch = judge_scratch(train_record, to) if judge else scratch_curve(train_record, to)
    original = load_judge() if judge else load_cifar_resnet(source)
    converted, leg_cpu = original, 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, step in enumerate(chain):
            if i:  # a round trip: the first leg is calibrated (by default) before the way back, or the way back
                # would only restore the original's own weights (moving a stride back is exact on a plain copy)
                converted, cpu = timed(calibrate, converted, original, data["calib"], num_images=None,
                                       batch_size=CALIB_BATCH, seed=args.seed, progress=False,
                                       bf16=args.calib_bf16, channels_last=args.channels_last)
                leg_cpu += cpu
            converted = convert(converted, step, input_size=(3, data["size"], data["size"]))
    reference = predict(original, data["test"], batch_size=500, progress=False)  # the original's logits, once
    plain = " (plain)" if to == "v1.5" and len(chain) == 1 else ""
    result = {"rewrite": pair, "label": " -> ".join([source, *chain]) + plain, "first_leg_cpu_seconds": round(leg_cpu, 1),
              "source": source, "to": to, "scratch": scratch, "points": [], "finished": False}
    base = None

    def add(step: str, budget: str, model, cpu: float, **extra) -> None:
        report = evaluate(model, data["test"], reference=None if base is None else reference, batch_size=500,
                          progress=False)
        result["points"].append(point(step, budget, report, base if base is not None else report.top1, cpu,
                                      scratch["cpu_seconds"], **extra))
        p = result["points"][-1]
        print(f"  {result['label']}: {step} {budget}: {p['top1']:.2f} ({p['cpu_seconds']:.1f} CPU s)", flush=True)

    add("original", "", original, 0.0)
    base = result["points"][0]["top1"]
    add("naive copy", "0", converted, 0.0)
    if args.model == JUDGE_NAME:  # BatchNorm re-estimation alone, the first half of the default calibration
        bn, bn_cpu = timed(calibrate, converted, original, data["calib"], num_images=None, steps=("bn",),
                           batch_size=CALIB_BATCH, seed=args.seed, progress=False, channels_last=args.channels_last)
        add("bn", f"{len(data['calib'])} images", bn, bn_cpu)
    calibrated, calib_cpu = timed(calibrate, converted, original, data["calib"], num_images=None,
                                  batch_size=CALIB_BATCH, seed=args.seed, progress=False, iterations=args.iterations,
                                  bf16=args.calib_bf16, channels_last=args.channels_last)
    iterations = "/".join(str(n) for n in dict.fromkeys(b.iterations for b in history(calibrated).calibration.blocks))
    add("calibration", f"{iterations} it./block, {len(data['calib'])} images", calibrated, calib_cpu,
        run_cpu_seconds=round(calib_cpu, 1),
        blocks_kept=[b.kept for b in history(calibrated).calibration.blocks])
    for step, dataset, steps, budget in recovery_runs(args, data):
        objective = {"objective": "features"} if step == "features" else {"objective": "both", "alpha": ALPHA}
        model, call_cpu = timed(finetune, calibrated, original, dataset, steps=steps, augment="cifar", bf16=args.bf16,
                                channels_last=args.channels_last, batch_size=BATCH, seed=args.seed, progress=False,
                                **objective)
        ft = history(model).finetune
        # The run's own training time (the report's); call_cpu_seconds adds its setup and before/after guard.
        add(step, budget, model, calib_cpu + ft.cpu_seconds, steps=ft.steps, images=ft.images,
            run_cpu_seconds=round(ft.cpu_seconds, 1), call_cpu_seconds=round(call_cpu, 1), kept=ft.kept)
        on_progress(result)  # a run cut short keeps the budgets it finished
    result["headline"] = headline(result["points"], base, scratch)
    result["finished"] = True
    return result


def pct(p: float) -> str:
    return f"{p:.3g}%" if p < 1 else f"{p:.1f}%"


def headline_lines(r: dict) -> list[str]:
    h = r.get("headline")
    if h is None:
        return [f"- {r['label']}: unfinished"]
    at = lambda p: "not reached within the measured budget" if p is None else (  # noqa: E731
        f"{p['step']} {p['budget']}: {p['top1']:.2f} at {p['cpu_seconds']:.0f} CPU s = {pct(p['percent'])}")
    g = h["goal"]
    if g["met"]:
        goal = f"met ({pct(g['within_at_percent'])} of from-scratch compute)"
    else:
        reach = ("never within 0.3 point" if g["within_at_percent"] is None
                 else f"within 0.3 point only at {pct(g['within_at_percent'])}")
        best = g["best_within_goal"]
        short = "" if best is None else f"; best at <= 10%: {best['top1']:.2f}, {g['short_by_points']:.2f} point short"
        goal = f"**NOT MET** ({reach}{short})"
    return [f"- {r['label']}: within {TOLERANCE} point: {at(h['within'])}; matches the original: {at(h['match'])}; "
            f"from scratch within {TOLERANCE} point: {at(h['scratch_within'])}. Goal (within {TOLERANCE} point at "
            f"<= {GOAL_PERCENT:g}% of from-scratch compute): {goal}."]


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"Recovery cost on the CIFAR-10 test set ({s['test_images']} images), CPU seconds on {s['threads']} thread{'s' * (s['threads'] != 1)} "
        f"(CPU: {', '.join(result['cpu_flags']) or 'flags unknown'}; torch {result['torch']}). Calibration and "
        f"feature mimicking use the same {s['calibration_images']} unlabelled training images; fine-tuning uses "
        f"{s['finetune_images']} labelled ones. Every budget is a separate run from the calibrated model, and its "
        "CPU s include the calibration's. "
        + ("From scratch: train_resnet50.json's recorded training of the v1.5 layout (process CPU seconds), "
           f"{s['input_size']}x{s['input_size']} inputs; " if s.get("model") == JUDGE_NAME else
           "From scratch: train_cifar.json's recorded training of the target layout; its CPU seconds are wall "
           "seconds x the threads it ran at (an approximation), ")
        + "its top-1 is on the full test set, and 100% is its whole recorded training. "
        f"Reconstruction {'under bf16 autocast' if s.get('calibration_bf16') else 'in float32'}, feature mimicking "
        f"and fine-tuning {'under bf16 autocast' if s['bf16'] else 'in float32'}"
        f"{', channels-last' if s.get('channels_last') else ''}.",
        "",
    ]
    if s.get("extra_budgets"):  # merged from later runs: their points count that run's own calibration time
        added = "; ".join(f"{pair}: " + ", ".join([f"{n} steps" for n in b["feature_steps"]]
                                                   + [f"{f:g} epochs" for f in b["finetune_fractions"]])
                          for pair, b in s["extra_budgets"].items())
        lines += [f"Added from later runs with the same settings (`--merge`; their CPU s include that run's own "
                  f"calibration): {added}.", ""]
    for r in result["rewrites"]:
        sc = r["scratch"]
        never = "only v1.5" if result["settings"].get("model") == JUDGE_NAME else "d was never"
        name = f"{sc['layout']}" + (f" (stand-in: {never} trained from scratch)" if sc["stand_in"] else "")
        lines += [f"### {r['label']}", "",
                  f"From scratch: {name}, {sc['epochs']} epochs, {sc['cpu_seconds']:.0f} CPU s = 100%, "
                  f"top-1 {sc['top1']:.2f}.", "",
                  "| step | budget | top-1 % | vs original | CPU s | % of from scratch |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        for p in r["points"]:
            first = p["step"] == "original"
            delta, share = ("", "") if first else (f"{p['vs_original']:+.2f}", pct(p["percent"]))
            kept = " *" if p.get("kept", "trained") != "trained" else ""
            lines.append(f"| {p['step']} | {p['budget']} | {p['top1']:.2f}{kept} | {delta} | {p['cpu_seconds']:.1f} | "
                         f"{share} |")
        ends = [p for i, p in enumerate(sc["points"]) if i + 1 == len(sc["points"]) or sc["points"][i + 1]["cycle"] != p["cycle"]]
        for p in ends:  # the end of each training cycle; the whole curve is in cost.json and cost.png
            lines.append(f"| from scratch ({sc['layout']}) | epoch {p['epoch']} (end of cycle {p['cycle']}) | "
                         f"{p['top1']:.2f} | {p['top1'] - r['points'][0]['top1']:+.2f} | {p['cpu_seconds']:.0f} | "
                         f"{pct(p['percent'])} |")
        lines.append("")
    lines += ["\\* training left the model worse by its own objective, so finetune returned its input (the "
              "calibrated model); the run's compute still counts.", "", "### Headlines", ""] + [line for r in result["rewrites"] for line in headline_lines(r)]
    return "\n".join(lines) + "\n"


def plot_panel(ax, r: dict) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    pts, sc = r["points"], r["scratch"]
    base = pts[0]["top1"]
    by = lambda step: [p for p in pts if p["step"] == step]  # noqa: E731
    mean = {s: sum(p["top1"] for p in by(s)) / max(1, len(by(s))) for s in LABELLED}
    for step, style, label in SERIES:
        ps = by(step)
        if not ps:
            continue
        ax.plot([p["percent"] for p in ps], [p["top1"] for p in ps], style, label=label, ms=6)
        # The higher series is labelled above its points and the lower one below, so the labels do not collide.
        offset = (4, 5) if mean.get(step, 0) >= max(mean.values()) else (4, -11)
        for p in ps if step in LABELLED else ():  # the budget beside each point; an input kept by finetune's guard is marked
            text = p["budget"].split(" (")[0].replace(" steps", "").replace(" epoch", " ep")
            mark = "*" if p.get("kept", "trained") != "trained" else ""
            ax.annotate(text + mark, (p["percent"], p["top1"]), textcoords="offset points", xytext=offset, fontsize=7)
    ax.plot([p["percent"] for p in sc["points"]], [p["top1"] for p in sc["points"]], ".-", color="0.55",
            label="from scratch (epochs; cycles restart the schedule)")
    ax.axhline(base, color="k", lw=1, label="original")
    ax.axhline(base - TOLERANCE, color="k", lw=1, ls="--", label=f"original - {TOLERANCE} point")
    ax.axvline(GOAL_PERCENT, color="tab:red", lw=1, ls=":", label=f"{GOAL_PERCENT:g}% of from-scratch compute")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}%"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    # Focus on the recovered range: the early from-scratch epochs (30-70%) would squash it; they enter from below.
    low = min(p["top1"] for p in pts if p["step"] not in ("original", "naive copy"))
    ax.set_ylim(min(low, base - TOLERANCE) - 1.0, max(max(p["top1"] for p in pts), sc["top1"], base) + 0.7)
    naive = by("naive copy")
    scratch = f"from scratch: {sc['layout']}" + (" (stand-in)" if sc["stand_in"] else "")
    ax.set_title(f"{r['label']}: original {base:.2f}" + (f", naive copy {naive[0]['top1']:.1f}" if naive else "")
                 + f"\n{scratch}, 100% = {sc['cpu_seconds']:.0f} CPU s", fontsize=9)
    ax.set_xlabel("compute, % of training the target from scratch (log)", fontsize=8)
    ax.set_ylabel("CIFAR-10 test top-1 (%)", fontsize=8)
    ax.grid(alpha=0.3, which="both")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(result["rewrites"])
    cols, rows = min(n, 2), math.ceil(n / 2)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.4 * rows + 0.6), squeeze=False)
    for ax, r in zip(axes.flat, result["rewrites"]):
        plot_panel(ax, r)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    handles = {}  # one legend for every panel, below them, where it hides no point
    for ax in list(axes.flat)[:n]:
        handles.update({label: h for h, label in zip(*ax.get_legend_handles_labels())})
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(4, len(handles)), fontsize=8)
    threads = result["settings"]["threads"]
    fig.suptitle(f"Recovery against training from scratch (CPU s on {threads} thread{'s' * (threads != 1)}; "
                 "* = finetune kept its input)", fontsize=11)
    fig.tight_layout(rect=(0, 0.55 / (4.4 * rows + 0.6), 1, 1))
    with atomic_file(path, force=True) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out, force=True) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    with atomic_file(out.with_suffix(".md"), force=True) as tmp:
        tmp.write_text(table)
    plot(result, out.with_suffix(".png"))
    print(f"written: {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}", flush=True)


def previous(out: Path, settings: dict, resume: bool) -> dict:
    """The finished rewrites of an earlier run with the same settings, by pair ({} without --resume)."""
    if not resume or not out.exists():
        return {}
    old = json.loads(out.read_text())
    if old.get("settings") != settings:
        print(f"--resume: {out} was measured with other settings; measuring again", flush=True)
        return {}
    return {r["rewrite"]: r for r in old.get("rewrites", []) if r.get("finished")}


def merge(out: Path, extras: list[Path]) -> dict:
    """``out``'s result with the feature and fine-tuning points of ``extras`` (runs of the same rewrites with
    other budgets and otherwise the same settings) added to its rewrites; headlines recomputed.

    Args:
        out: the main cost.json.
        extras: cost JSON files of runs (finished or cut short) measured with other --feature-steps/--finetune-fractions.
    """
    result = json.loads(out.read_text())
    same = lambda s: {k: v for k, v in s.items() if k not in ("feature_steps", "finetune_fractions", "extra_budgets")}  # noqa: E731
    by_pair = {r["rewrite"]: r for r in result["rewrites"]}
    order = {"original": 0, "naive copy": 1, "bn": 1.5, "calibration": 2, "features": 3, "finetune": 4}
    for path in extras:
        extra = json.loads(path.read_text())
        if same(extra["settings"]) != same(result["settings"]):
            raise SystemExit(f"{path} was measured with other settings than {out}; measure it again")
        for r in extra["rewrites"]:
            main = by_pair.get(r["rewrite"])
            if main is None:  # a rewrite the main result does not have: nothing to add it to
                continue
            have = {(p["step"], p["budget"]) for p in main["points"]}
            main["points"] += [p for p in r["points"] if p["step"] in LABELLED and (p["step"], p["budget"]) not in have]
            main["points"].sort(key=lambda p: (order[p["step"]], p.get("steps", 0)))
            main["headline"] = headline(main["points"], main["points"][0]["top1"], main["scratch"])
            budgets = result["settings"].setdefault("extra_budgets", {}).setdefault(r["rewrite"], {})
            for key in ("feature_steps", "finetune_fractions"):
                budgets[key] = sorted(set(budgets.get(key, [])) | set(extra["settings"][key]))
    write(out, result)
    return result


def load_data(args) -> dict:
    size = load_judge().input_size if args.model == JUDGE_NAME else 32
    test_images, test_labels = subset(*cifar10_tensors(args.data, "test"), args.test_images, args.seed)
    train_images, train_labels = cifar10_tensors(args.data, "train")
    calib_images, _ = subset(train_images, train_labels, args.calib_images, args.seed)
    ft_images, ft_labels = subset(train_images, train_labels, args.finetune_images, args.seed + 1)
    prepare = lambda x: resized(normalize_uint8(x), size)  # noqa: E731
    return {"test": TensorDataset(prepare(test_images), test_labels),
            "calib": TensorDataset(prepare(calib_images)),  # no labels: calibration does not use them
            "train": TensorDataset(prepare(ft_images), ft_labels), "size": size}


def resized(images: torch.Tensor, size: int, chunk: int = 1000) -> torch.Tensor:
    """Images upsampled as train_resnet50.py feeds them (bilinear, antialiased), a chunk at a time."""
    if images.shape[-1] == size:
        return images
    import torch.nn.functional as F

    return torch.cat([F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
                      for x in images.split(chunk)])


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("cifar", JUDGE_NAME), default="cifar",
                   help="the committed CIFAR-10 models, or the trained ResNet-50 (weights/)")
    p.add_argument("--rewrites", nargs="+", default=None, choices=REWRITES + JUDGE_REWRITES,
                   help="source:target pairs (default: the model's)")
    p.add_argument("--test-images", type=int, default=None, help="evaluate on a subset (default: all 10,000)")
    p.add_argument("--calib-images", type=int, default=2048, help="unlabelled training images for calibration")
    p.add_argument("--iterations", type=int, default=None, help="block reconstruction steps per block (default: calibrate's)")
    p.add_argument("--feature-steps", type=int, nargs="*", default=[500, 1000, 2000],
                   help="feature mimicking budgets, one run each")
    p.add_argument("--finetune-images", type=int, default=50000, help="labelled training images for fine-tuning")
    p.add_argument("--finetune-fractions", type=float, nargs="*", default=[0.25, 0.5, 1.0],
                   help="fine-tuning budgets in epochs over --finetune-images, one run each")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="train under bf16 autocast")
    p.add_argument("--calib-bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="reconstruct under bf16 autocast")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="reconstruct and train in channels-last memory format")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=SHARED, help="shared data folder holding cifar10/{train,test}.tar")
    p.add_argument("--train-record", type=Path, default=None,
                   help="the record of the from-scratch training (default: train_cifar.json or train_resnet50.json)")
    p.add_argument("--resume", action="store_true", help="reuse the finished rewrites of --out (same settings)")
    p.add_argument("--out", type=Path, default=None, help="default: results/cost.json or cost-resnet50.json")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="measure nothing: add the feature and fine-tuning points of these finished runs (other "
                        "budgets, same settings) to --out and write it again")
    args = p.parse_args(argv)
    judge = args.model == JUDGE_NAME
    args.rewrites = args.rewrites or list(JUDGE_REWRITES if judge else REWRITES)
    args.train_record = args.train_record or RESULTS / ("train_resnet50.json" if judge else "train_cifar.json")
    args.out = args.out or RESULTS / ("cost-resnet50.json" if judge else "cost.json")
    if min(args.feature_steps, default=1) < 1 or min(args.finetune_fractions, default=1) <= 0:
        p.error("--feature-steps must be >= 1 and --finetune-fractions > 0")
    if not args.train_record.is_file():
        p.error(f"no from-scratch record at {args.train_record} (run benchmarks/train_cifar.py or train_resnet50.py)")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if args.merge:
        print(markdown(merge(args.out, args.merge)))
        return
    torch.set_num_threads(args.threads)
    train_record = json.loads(args.train_record.read_text())
    data = load_data(args)
    settings = {"model": args.model, "input_size": data["size"], "test_images": len(data["test"]),
                "calibration_images": len(data["calib"]),
                "finetune_images": len(data["train"]), "iterations_per_block": args.iterations or "calibrate's",
                "calibration_batch_size": CALIB_BATCH, "feature_steps": args.feature_steps,
                "finetune_fractions": args.finetune_fractions, "batch_size": BATCH, "alpha": ALPHA,
                "augment": "cifar", "bf16": args.bf16, "calibration_bf16": args.calib_bf16,
                "channels_last": args.channels_last, "seed": args.seed, "threads": args.threads}
    done = previous(args.out, settings, args.resume)
    start, runs = time.time(), []

    def save(partial: dict | None = None) -> dict:
        if partial is not None:  # the rewrite being measured, as far as it got
            runs[-1] = partial
        result = {
            "benchmark": "cost", "dataset": "CIFAR-10 JPEG (../shared/data/cifar10)", "settings": settings,
            "tolerance_points": TOLERANCE, "goal_percent": GOAL_PERCENT, "cpu_flags": cpu_extensions(),
            "torch": torch.__version__, "platform": platform.platform(), "threads": args.threads,
            "from_scratch_record": str(args.train_record), "wall_seconds": round(time.time() - start, 1),
            "rewrites": runs}
        write(args.out, result)
        return result

    for pair in args.rewrites:
        if pair in done:
            print(f"{pair}: reused from {args.out}", flush=True)
            runs.append(done[pair])
            continue
        runs.append(None)
        runs[-1] = run_rewrite(pair, args, data, train_record, save)
        save()  # after every rewrite, so a run cut short keeps what it finished
    print(markdown(save()))

if __name__ == "__main__":
    main()
