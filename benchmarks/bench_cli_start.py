"""How long the command line takes to answer before any work: --help, --version, an argument error, against
importing the library (torch, torchvision, onnx) that it no longer imports for them.

    python benchmarks/bench_cli_start.py      # writes benchmarks/results/cli-start.json

Each command runs --repeat times in a fresh process (wall seconds, median and max); one process at a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COMMAND = str(Path(sys.executable).with_name("resnet-surgery"))
CASES = {
    "--help": [COMMAND, "--help"],
    "--version": [COMMAND, "--version"],
    "convert --help": [COMMAND, "convert", "--help"],
    "argument error (convert without --out)": [COMMAND, "convert", "resnet18"],
    "import resnet_surgery (lazy root)": [sys.executable, "-c", "import resnet_surgery"],
    "import the library (torch, torchvision, onnx)": [sys.executable, "-c", "import resnet_surgery.deploy.export"],
}


def timed(command: list[str], repeat: int) -> dict:
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=False)
        seconds.append(time.perf_counter() - start)
    return {"median_s": round(statistics.median(seconds), 3), "max_s": round(max(seconds), 3), "runs": repeat}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS / "cli-start.json")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from resnet_surgery.deploy.cpu import cpu_extensions

    result = {"date": time.strftime("%Y-%m-%d"), "cpu_flags": cpu_extensions(), "python": sys.version.split()[0],
              "cases": {name: timed(command, args.repeat) for name, command in CASES.items()}}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, r in result["cases"].items():
        print(f"{name:<48} median {r['median_s']:.2f} s  max {r['max_s']:.2f} s")


if __name__ == "__main__":
    main()
