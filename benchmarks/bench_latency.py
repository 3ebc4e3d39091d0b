"""How much faster or slower each downsampling variant runs in onnxruntime on this machine.

    python benchmarks/bench_latency.py                         # resnet50 and resnet18, batch 1 and 8, 2 threads
    python benchmarks/bench_latency.py --archs resnet18 --min-time 0.5 --max-time 1   # a quick smoke run

For torchvision resnet50 and resnet18 (random init: latency does not depend on the weights): the original
v1.5, convert(to="v1"), convert(to="d") and convert(v1, prune_dead=True), each exported with
resnet_surgery.export_onnx (parity verified) at 224 x 224 and timed together in interleaved rounds by
resnet_surgery.compare_latency (method: resnet_surgery/deploy/latency.py). Comparisons: v1 / v1.5, d / v1.5 and
pruned v1 / v1, each a ratio of median latencies with a 95% paired bootstrap interval, beside the ratio of
MACs (resnet_surgery.inspect). Variants the engine leaves unchanged (resnet18's BasicBlocks have no 1x1
conv to take the stride, so its v1 is its v1.5 and nothing is dead) are reported as such, not timed.

Writes benchmarks/results/latency.json, latency.md (the tables) and latency-<arch>.png. It needs the
CPU to itself: run it on an idle machine; the report warns when the load average says otherwise.
With the defaults it takes about 5-8 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision

from resnet_surgery import convert, history, inspect
from resnet_surgery.atomic import atomic_file
from resnet_surgery.deploy.export import export_onnx
from resnet_surgery.deploy.latency import compare_latency

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# (converted, baseline): what each comparison divides.
COMPARISONS = (("v1", "v1.5"), ("d", "v1.5"), ("v1-pruned", "v1"))


def variants(arch: str) -> tuple[dict, list[str]]:
    """The models to time by variant name, and notes on the variants that are not different models."""
    base = torchvision.models.get_model(arch, weights=None).eval()
    models, notes = {"v1.5": base}, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v1 = convert(base, "v1")
        d = convert(base, "d")
        pruned = convert(v1, prune_dead=True)
    for name, model in (("v1", v1), ("d", d), ("v1-pruned", pruned)):
        if history(model).recipe.rewrites:
            models[name] = model
        else:
            notes.append(
                f"{arch} {name}: the engine changes nothing ({'; '.join(history(model).recipe.notices)})"
            )
    return models, notes


def run_arch(arch: str, args, onnx_dir: Path) -> dict:
    models, notes = variants(arch)
    size = (3, args.input_size, args.input_size)
    macs = {name: inspect(m, size).macs for name, m in models.items()}
    paths, parity = {}, {}
    for name, model in models.items():
        paths[name] = onnx_dir / f"{arch}-{name}.onnx"
        start = time.perf_counter()
        report = export_onnx(model, paths[name], input_size=size, force=True)
        print(
            f"exported {paths[name].name} in {time.perf_counter() - start:.1f} s: parity max |diff| "
            f"{report.max_abs_diff:.2e}, {'pass' if report.passed else 'FAIL'}",
            file=sys.stderr,
        )
        parity[name] = report.to_dict()
    report = compare_latency(
        paths,
        batch_sizes=args.batch,
        threads=args.threads,
        min_time_s=args.min_time,
        max_time_s=args.max_time,
        min_rounds=args.min_rounds,
        warmup=args.warmup,
        macs=macs,
    )
    report.plot(args.out / f"latency-{arch}.png", force=True)
    comparisons = []
    for model, baseline in COMPARISONS:
        if model not in paths or baseline not in paths:
            continue
        for batch in args.batch:
            ci = report.ratio(model, baseline, batch)
            comparisons.append(
                {
                    "arch": arch,
                    "batch": batch,
                    "model": model,
                    "baseline": baseline,
                    "time_ratio": ci.ratio,
                    "ci_low": ci.low,
                    "ci_high": ci.high,
                    "mac_ratio": macs[model] / macs[baseline],
                }
            )
    return {"report": report, "comparisons": comparisons, "parity": parity, "notes": notes, "macs": macs}


def comparison_table(rows: list[dict]) -> str:
    lines = [
        f"{'arch':<9} {'batch':>5}  {'comparison':<18} {'MAC ratio':>9}  {'time ratio [95% CI]':<24}",
        "-" * 70,
    ]
    for r in rows:
        lines.append(
            f"{r['arch']:<9} {r['batch']:>5}  {r['model'] + ' / ' + r['baseline']:<18} {r['mac_ratio']:>9.3f}  "
            f"{r['time_ratio']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        )
    lines.append("ratio below 1: the first model is faster (fewer MACs)")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="resnet50,resnet18", help="comma-separated torchvision models")
    parser.add_argument("--batch", default="1,8", type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--min-time", type=float, default=30.0, help="seconds of timing per arch and batch, at least"
    )
    parser.add_argument(
        "--max-time", type=float, default=60.0, help="seconds per arch and batch at most (after --min-rounds)"
    )
    parser.add_argument("--min-rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for latency.json, .md and .png")
    parser.add_argument("--keep-onnx", metavar="DIR", help="keep the exported .onnx files in DIR")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # The .onnx files (about 100 MB each) stay out of the repository unless --keep-onnx names a folder.
    with tempfile.TemporaryDirectory(prefix="bench_latency.") as scratch:
        onnx_dir = Path(args.keep_onnx or scratch)
        results = {arch: run_arch(arch, args, onnx_dir) for arch in args.archs.split(",")}
    rows = [r for res in results.values() for r in res["comparisons"]]
    notes = [n for res in results.values() for n in res["notes"]]
    text = "\n\n".join(
        [
            *(f"## {arch}\n\n{res['report']}" for arch, res in results.items()),
            "## comparisons\n\n" + comparison_table(rows),
            *(f"note: {n}" for n in notes),
        ]
    )
    first = next(iter(results.values()))["report"]
    out = {
        "date": first.machine["date"],
        "machine": first.machine,
        "settings": {**vars(args), "archs": args.archs.split(","), "out": str(args.out)},
        "wall_seconds": round(time.perf_counter() - start, 1),
        "comparisons": rows,
        "notes": notes,
        "archs": {
            arch: {"macs": res["macs"], "parity": res["parity"], "latency": res["report"].to_dict()}
            for arch, res in results.items()
        },
    }
    with atomic_file(args.out / "latency.json", force=True) as tmp:
        tmp.write_text(json.dumps(out, indent=2))
    with atomic_file(args.out / "latency.md", force=True) as tmp:
        tmp.write_text(f"# Latency ({first.machine['date']}, {first.machine['cpu']})\n\n```\n{text}\n```\n")
    print(text)
    print(
        f"\nwritten: {args.out / 'latency.json'}, latency.md, latency-<arch>.png "
        f"({out['wall_seconds']:.0f} s)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
