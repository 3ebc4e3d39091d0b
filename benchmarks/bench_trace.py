"""How long tracing, finding blocks and converting take (issue: "resnet152 well under a second").

Writes benchmarks/results/trace.json and prints a table. Median of --repeats runs after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
import torchvision

from resnet_surgery import SurgeryNotice, convert, find_blocks, trace
from resnet_surgery.utils import table

OUT = Path(__file__).resolve().parent / "results" / "trace.json"


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_model(name: str, repeats: int) -> dict:
    """Median seconds of each surgery step on one torchvision model."""
    model = torchvision.models.get_model(name).eval()
    v1 = convert(model, "v1")
    return {
        "model": name,
        "trace_and_find_blocks_s": median_seconds(lambda: find_blocks(trace(model)), repeats),
        "convert_to_v1_s": median_seconds(lambda: convert(model, "v1"), repeats),
        "convert_to_d_s": median_seconds(lambda: convert(model, "d"), repeats),
        "prune_dead_s": median_seconds(lambda: convert(v1, prune_dead=True), repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="resnet50,resnet152")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore", SurgeryNotice)
    torch.set_num_threads(2)
    rows = [time_model(name, args.repeats) for name in args.models.split(",")]
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "load_average": os.getloadavg(), "torch": torch.__version__, "rows": rows}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    keys = list(rows[0])[1:]
    print("\n".join(table([("model", *keys)] + [(r["model"], *(f"{r[k]:.3f}" for k in keys)) for r in rows])))
    print(f"written: {OUT}")


if __name__ == "__main__":
    main()
