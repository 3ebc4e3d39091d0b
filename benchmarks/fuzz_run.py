"""A fuzz run whose counts are kept: tests/test_fuzz.py at a profile, then its cases per table row, its
failures and the machine in benchmarks/results/fuzz.json (what docs/setup.md and the README quote).

    python benchmarks/fuzz_run.py --profile 300        # RESNET_SURGERY_FUZZ=300, two pytest workers
    python benchmarks/fuzz_run.py --profile long       # what `make fuzz` runs: 1,000 cases a row

One run at a time on an idle machine: each worker uses one thread.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="long", help="short, long or a number of cases per row")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("-k", dest="select", help="pytest -k expression (a subset of the rows)")
    parser.add_argument("--out", type=Path, default=RESULTS / "fuzz.json")
    parser.add_argument("--log", type=Path, help="also write pytest's whole output here (each failure's case)")
    args = parser.parse_args(argv)

    from resnet_surgery.deploy import cpu_extensions, cpu_model

    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "counts"
        env = {**os.environ, "RESNET_SURGERY_FUZZ": args.profile, "RESNET_SURGERY_FUZZ_COUNTS": str(prefix),
               "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(args.workers),
                   "tests/test_fuzz.py", *(["-k", args.select] if args.select else [])]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if args.log:
            args.log.write_text(done.stdout + done.stderr)
        counts = collections.Counter()
        for path in Path(tmp).glob("counts.*.json"):
            counts.update(json.loads(path.read_text()))
    failed = [line.split(" ", 1)[1].split(" - ")[0] for line in done.stdout.splitlines() if line.startswith("FAILED ")]
    result = {
        "date": datetime.date.today().isoformat(), "profile": args.profile, "workers": args.workers,
        "wall_seconds": round(seconds), "cases": sum(counts.values()),
        "kills": sum(n for row, n in counts.items() if row.startswith("kill: ")),
        "failed": failed, "summary": done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "",
        "per_row": dict(sorted(counts.items())), "cpu": cpu_model(), "cpu_flags": cpu_extensions(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['cases']} cases ({result['kills']} kills) in {seconds / 60:.0f} min: {result['summary']}")
    print("\n".join(f"FAILED {f}" for f in failed))
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
