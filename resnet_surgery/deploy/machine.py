"""The machine a latency run ran on: its attainable float32 peak, cores, CPU model, load and versions."""

from __future__ import annotations

import datetime
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from .cpu import cpu_extensions
from .runtime import onnx_session, runner

__all__ = ["BUSY_LOAD", "cpu_model", "load_warnings", "machine_info", "measure_peak_gflops", "usable_cores"]

BUSY_LOAD = 0.5  # warn when the load average exceeds this fraction of the cores


def measure_peak_gflops(threads: int, *, n: int = 2048, reps: int = 5, device: str = "cpu") -> float:
    """This machine's attainable float32 GFLOP/s: the best of ``reps`` n x n products in onnxruntime.

    A one-node MatMul model in a session configured like the timed ones, so the peak comes from the
    same kernels (MLAS on CPU), threads and provider as the models it is compared with.

    Args:
        threads: intra-op threads, as the timed sessions use.
        n: the matrices' side.
        reps: timed products (after one warm-up).
        device: "cpu" or "cuda".

    Returns:
        GFLOP/s of the fastest product.
    """
    a = helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])
    b = helper.make_tensor_value_info("B", TensorProto.FLOAT, [n, n])
    c = helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "peak", [a, b], [c])
    # IR version 8 / opset 17: old enough for every onnxruntime this package supports.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = onnx_session(model.SerializeToString(), threads=threads, timing=True, device=device)
    rng = np.random.default_rng(0)
    x = {
        "A": rng.standard_normal((n, n), dtype=np.float32),
        "B": rng.standard_normal((n, n), dtype=np.float32),
    }
    run = runner(session, x, device)
    best = float("inf")
    for _ in range(reps + 1):  # the first product warms up the thread pool
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def load_warnings(load_before: list[float], load_after: list[float]) -> list[str]:
    """Warnings for a 1-minute load average above ``BUSY_LOAD`` of the cores before or after the run.

    Args:
        load_before: os.getloadavg() before the timing.
        load_after: os.getloadavg() after it.

    Returns:
        Zero, one or two warnings.
    """
    cores = os.cpu_count() or 1
    return [
        f"the machine was busy {when} the run (1-minute load average {load[0]:.2f} on {cores} cores); "
        "timings may be noisy and slower than on an idle machine"
        for when, load in (("before", load_before), ("after", load_after))
        if load[0] > BUSY_LOAD * cores
    ]


def usable_cores() -> int:
    """The cores this process may run on.

    Returns:
        The affinity mask's size on Linux, else the machine's cores.
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name.

    Returns:
        /proc/cpuinfo's model name, else what the platform module knows.
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(provider: str) -> dict:
    """What a latency report quotes about the machine and software.

    Args:
        provider: the execution provider the sessions ran on.

    Returns:
        cpu, its instruction-set extensions, cores, usable_cores, platform, versions, provider and the date.
    """
    return {
        "cpu": cpu_model(),
        "cpu_extensions": cpu_extensions(),  # AVX2 / AVX-512 / VNNI / BF16 / AMX: what int8 and fp32 kernels use
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "provider": provider,
        "numpy": np.__version__,
        "torch": torch.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
