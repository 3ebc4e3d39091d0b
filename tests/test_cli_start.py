"""The command line answers --help, --version and argument errors without importing torch, torchvision or
onnx (seconds of imports): every command module imports the library inside its function."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

PROBE = """
import sys
from resnet_surgery.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "torchvision", "onnx", "onnxruntime", "numpy") if m in sys.modules)
print("RESULT", code, ",".join(heavy) or "-", file=sys.stderr)
"""


@pytest.mark.parametrize("args, code", [
    (["--help"], 0), (["--version"], 0), (["convert", "--help"], 0), (["recover", "--help"], 0),
    (["explore", "--help"], 0), (["export", "--help"], 0),
    (["convert", "resnet18"], 2),  # --out is missing
    (["run", "resnet50", "--to", "v9", "--out", "x"], 2),  # not a variant
    (["recover", "x", "--data", ".", "--out", "y", "--budget", "soon"], 2),  # x does not exist
    (["bench"], 2),
])
def test_help_version_and_argument_errors_import_nothing_heavy(args, code):
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    result = done.stderr.strip().splitlines()[-1].split()
    assert result[0] == "RESULT" and int(result[1]) == code, done.stderr
    assert result[2] == "-", f"{args} imported {result[2]}"


def test_the_installed_command_answers_help_quickly():
    command = Path(sys.executable).with_name("resnet-surgery")
    start = time.perf_counter()
    done = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    assert done.returncode == 0 and "recover" in done.stdout
    # Generous (importing torch alone takes 2-3 s here; the figure is in benchmarks/results/cli-start.json).
    assert seconds < 5, seconds


def test_the_package_root_imports_its_api_on_first_use():
    probe = ("import sys, resnet_surgery as rs; assert 'torch' not in sys.modules; "
             "assert all(hasattr(rs, n) for n in rs.__all__); assert 'torch' in sys.modules; "
             "assert sorted(rs.__all__, key=str.lower) == sorted(rs._EXPORTS, key=str.lower); "
             "import pytest; pytest.raises(AttributeError, getattr, rs, 'nothing'); "
             # the function `history`, not the submodule of the same name that the imports above loaded
             "import resnet_surgery.history; assert callable(rs.history) and rs.history.__name__ == 'history'")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
