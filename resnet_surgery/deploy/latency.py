"""Compare the inference latency of ONNX models in onnxruntime, with numbers a performance engineer can defend.

The method is ``METHOD`` below; every report quotes it.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper
from tqdm.auto import tqdm

from ..atomic import atomic_file
from ..errors import SurgeryError
from .cpu import cpu_extensions
from .onnxfile import input_info, is_quantized, load_onnx_header, stored_macs

CI_WARN = 0.03  # warn when a ratio's 95% interval is wider than +-3%
BUSY_LOAD = 0.5  # warn when the load average exceeds this fraction of the cores
# A constant, not parsed from the docstring: `python -OO` strips docstrings.
METHOD = """\
- One onnxruntime ``InferenceSession`` per model, all with the same ``SessionOptions``: graph
  optimisation level ``ORT_ENABLE_ALL``, ``intra_op_num_threads`` = the thread count asked for (default:
  every core this process may use), ``inter_op_num_threads`` = 1, sequential execution, and
  ``session.intra_op.allow_spinning`` = 0 so that idle sessions do not spin on cores the timed one needs.
- Every model gets the same input: one seeded standard-normal batch per batch size.
- Warm-up runs (``warmup`` per model and batch size) are run and discarded.
- The models then run in interleaved rounds: each round runs every model once, in a freshly shuffled
  order (A B, B A, ...), so machine drift (frequency scaling, other processes) and order effects hit all
  models alike. Each run is timed with ``time.perf_counter`` around ``session.run``.
- Rounds repeat until both ``min_time_s`` and ``min_rounds`` are met, then continue until every ratio's
  95% interval is within +-``ci_target`` of its value or ``max_time_s`` is spent.
- Per model and batch size: median (p50), p90, p99, mean, standard deviation, and throughput
  (images/s = batch / median).
- Against the first model: the ratio of medians (model / first; below 1 is faster) with a 95% paired
  percentile bootstrap interval: rounds are resampled with replacement (2000 resamples) and both
  models' medians are taken over the same resampled rounds, which keeps the pairing that the
  interleaving created.
- Compute: achieved GFLOP/s = 2 x MACs x batch / median, when MACs are known (given, or stored in the
  file by ``export_onnx``), and its fraction of this machine's attainable peak, measured in the same
  run (before and after the timing; the better is kept) as the best of a few 2048 x 2048 float32
  matrix products in an onnxruntime session configured like the timed ones (same kernels, threads).
- Reported with the results: CPU model, cores, threads used, onnxruntime version and execution provider,
  and the load average before and after. Warnings when an interval is wider than +-3% or the load
  average exceeded half the cores (the machine was busy).
- ``device="cuda"`` (onnxruntime-gpu with CUDAExecutionProvider) binds input and output on the GPU with
  IO binding, so host-device copies are not timed.
""".strip()


# --- statistics: pure functions on arrays of timings -------------------------------------------------


@dataclasses.dataclass
class RatioCI:
    """A ratio of medians and its bootstrap confidence interval."""

    ratio: float
    low: float
    high: float
    confidence: float = 0.95

    @property
    def half_width(self) -> float:
        """Half the interval's width relative to the ratio (0.03 means +-3%)."""
        return (self.high - self.low) / 2 / self.ratio

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high


def ratio_ci(
    a,
    b,
    *,
    paired: bool = True,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> RatioCI:
    """median(a) / median(b) with a percentile bootstrap interval.

    ``paired``: a[i] and b[i] come from the same round, so resample round indices and keep pairs together;
    otherwise resample each array on its own.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("ratio_ci needs at least one timing in each array")
    if paired and a.shape != b.shape:
        raise ValueError(f"paired timings must have the same length, got {a.size} and {b.size}")
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, a.size, size=(n_resamples, a.size))
    ib = ia if paired else rng.integers(0, b.size, size=(n_resamples, b.size))
    ratios = np.median(a[ia], axis=1) / np.median(b[ib], axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return RatioCI(float(np.median(a) / np.median(b)), float(low), float(high), confidence)


def summarize(times_s, batch: int) -> dict:
    """Latency percentiles (ms) and throughput of one model at one batch size."""
    t = np.asarray(times_s, dtype=np.float64)
    p50, p90, p99 = np.percentile(t, [50, 90, 99])
    return {
        "n": int(t.size),
        "p50_ms": p50 * 1e3,
        "p90_ms": p90 * 1e3,
        "p99_ms": p99 * 1e3,
        "mean_ms": float(t.mean()) * 1e3,
        "std_ms": float(t.std(ddof=1)) * 1e3 if t.size > 1 else 0.0,
        "min_ms": float(t.min()) * 1e3,
        "images_per_s": batch / p50,
    }


def measure_peak_gflops(threads: int, *, n: int = 2048, reps: int = 5, device: str = "cpu") -> float:
    """This machine's attainable float32 GFLOP/s: the best of ``reps`` n x n products in onnxruntime.

    A one-node MatMul model in a session configured like the timed ones, so the peak comes from the
    same kernels (MLAS on CPU), threads and provider as the models it is compared with.
    """
    a = helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])
    b = helper.make_tensor_value_info("B", TensorProto.FLOAT, [n, n])
    c = helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "peak", [a, b], [c])
    # IR version 8 / opset 17: old enough for every onnxruntime this package supports.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = _make_session(model.SerializeToString(), threads, device)
    rng = np.random.default_rng(0)
    x = {
        "A": rng.standard_normal((n, n), dtype=np.float32),
        "B": rng.standard_normal((n, n), dtype=np.float32),
    }
    run = _runner(session, x, device)
    best = float("inf")
    for _ in range(reps + 1):  # the first product warms up the thread pool
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


# --- the report --------------------------------------------------------------------------------------


@dataclasses.dataclass
class LatencyReport:
    """Latency of each model at each batch size, ratios against the first model, and the machine."""

    models: dict[str, str]  # name -> path, in order; the first is the baseline
    batch_sizes: list[int]
    machine: dict
    settings: dict
    results: list[dict]  # one per (model, batch): summarize() plus ratio and compute figures
    timings_s: dict[str, dict[int, list[float]]]  # model -> batch -> per-round seconds
    peak_gflops: float | None
    load_before: list[float]
    load_after: list[float]
    warnings: list[str]
    method: str = METHOD

    def ratio(self, model: str, baseline: str, batch: int, **kwargs) -> RatioCI:
        """Paired ratio of medians between any two models of this run (e.g. pruned v1 against v1)."""
        return ratio_ci(self.timings_s[model][batch], self.timings_s[baseline][batch], **kwargs)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["timings_s"] = {m: {str(b): t for b, t in per.items()} for m, per in self.timings_s.items()}
        return d

    def __str__(self) -> str:
        m = self.machine
        lines = [
            f"Latency in onnxruntime {m['onnxruntime']} ({m['provider']}), {m['cpu']} "
            f"({' '.join(m.get('cpu_extensions') or ['no AVX2'])}), "
            f"{self.settings['threads']} of {m['cores']} cores, {m['date']}",
            f"load average before {self.load_before[0]:.2f}, after {self.load_after[0]:.2f}; "
            f"peak {self._peak_text()}",
        ]
        baseline = next(iter(self.models))
        ratio_head = f"ratio vs {baseline[:16]} [95% CI]"
        width = max(22, len(ratio_head))
        header = (
            f"{'model':<16} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'mean ms':>9} {'std ms':>8} "
            f"{'img/s':>8} {'n':>5}  {ratio_head:<{width}} {'MMACs':>7} "
            f"{'GFLOP/s':>8} {'% peak':>6}"
        )
        lines += [header, "-" * len(header)]
        for r in self.results:
            if r["model"] == baseline:
                ratio = "1 (baseline)"
            else:
                ratio = f"{r['ratio']:.3f} [{r['ratio_low']:.3f}, {r['ratio_high']:.3f}]"
            macs = f"{r['macs'] / 1e6:.1f}" if r["macs"] else "-"
            gflops = f"{r['gflops']:.1f}" if r["gflops"] else "-"
            peak = f"{100 * r['peak_fraction']:.1f}" if r["peak_fraction"] else "-"
            lines.append(
                f"{r['model'][:16]:<16} {r['batch']:>5} {r['p50_ms']:>9.3f} {r['p90_ms']:>9.3f} "
                f"{r['p99_ms']:>9.3f} {r['mean_ms']:>9.3f} {r['std_ms']:>8.3f} {r['images_per_s']:>8.1f} "
                f"{r['n']:>5}  {ratio:<{width}} {macs:>7} {gflops:>8} {peak:>6}"
            )
        lines.append(
            "ratio = median latency / baseline's median (below 1 is faster); 95% paired bootstrap CI"
        )
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def _peak_text(self) -> str:
        return (
            f"{self.peak_gflops:.1f} GFLOP/s (float32 matmul in onnxruntime)"
            if self.peak_gflops
            else "not measured"
        )

    def plot(self, path: str | os.PathLike, *, force: bool = True) -> Path:
        """Write a PNG of the latency distributions: one box per model, one panel per batch size."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(self.models)
        fig, axes = plt.subplots(
            1,
            len(self.batch_sizes),
            figsize=(max(4.5, 1.6 * len(names)) * len(self.batch_sizes), 4.5),
            squeeze=False,
        )
        for ax, batch in zip(axes[0], self.batch_sizes):
            data = [np.asarray(self.timings_s[n][batch]) * 1e3 for n in names]
            # Whiskers at p1/p99 and no fliers: a few scheduler hiccups would otherwise squash the boxes.
            ax.boxplot(data, tick_labels=names, showfliers=False, whis=(1, 99))
            for i, d in enumerate(data, start=1):
                ax.annotate(
                    f"{np.median(d):.3g}",
                    (i, np.median(d)),
                    xytext=(24, 0),
                    textcoords="offset points",
                    fontsize=8,
                    va="center",
                )
            ax.set_title(f"batch {batch}")
            ax.set_ylabel("latency per run (ms)")
            ax.tick_params(axis="x", labelrotation=20)
            ax.grid(axis="y", alpha=0.3)
        m = self.machine
        fig.suptitle(
            f"onnxruntime {m['onnxruntime']} {m['provider']}, {self.settings['threads']} threads, {m['cpu']}"
            " (box: quartiles and median; whiskers: p1-p99)",
            fontsize=9,
        )
        fig.tight_layout()
        with atomic_file(path, force) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        return Path(path)


# --- the measurement ---------------------------------------------------------------------------------


def compare_latency(
    models: dict[str, str | os.PathLike],
    *,
    batch_sizes=(1,),
    threads: int | None = None,
    min_time_s: float = 5.0,
    max_time_s: float | None = None,
    min_rounds: int = 20,
    warmup: int = 5,
    ci_target: float = 0.01,
    macs: dict[str, int] | None = None,
    seed: int = 0,
    device: str = "cpu",
    peak_matmul_n: int = 2048,
    progress: bool = True,
) -> LatencyReport:
    """Time ONNX models in interleaved rounds and compare each with the first (method: ``METHOD``).

    ``min_time_s`` / ``max_time_s`` (default 3 x min_time_s) are per batch size, for all models together.
    ``macs``: multiply-accumulates per image by model name; missing ones are read from the file's metadata.
    """
    batch_sizes = _check_request(models, batch_sizes, device, threads)
    threads = int(threads) if threads else _usable_cores()
    rules = StoppingRule(min_time_s, 3 * min_time_s if max_time_s is None else max(max_time_s, min_time_s),
                         min_rounds, warmup, ci_target, seed)
    paths = {name: Path(p) for name, p in models.items()}
    input_names, shape, dtype, file_macs, quantized = _check_models(paths, batch_sizes)
    macs = {name: (macs or {}).get(name, file_macs[name]) for name in paths}

    load_before = list(os.getloadavg())
    sessions = {name: _make_session(p, threads, device) for name, p in paths.items()}
    peak = measure_peak_gflops(threads, n=peak_matmul_n, device=device)
    timings = _time_batches(sessions, input_names, shape, dtype, batch_sizes, rules, device, progress)
    # Measured again after the timing: the better of the two is less disturbed by other processes.
    peak = max(peak, measure_peak_gflops(threads, n=peak_matmul_n, device=device))
    load_after = list(os.getloadavg())

    results, warns = result_rows(timings, batch_sizes, macs, peak, seed, quantized)
    warns += _load_warnings(load_before, load_after)
    provider = next(iter(sessions.values())).get_providers()[0]
    settings = {
        "threads": threads,
        "inter_op_threads": 1,
        "graph_optimization": "ORT_ENABLE_ALL",
        "allow_spinning": 0,
        "device": device,
        **dataclasses.asdict(rules),
        "bootstrap": "paired percentile, 2000 resamples, 95%",
        "input_shape": ["batch", *shape[1:]],
    }
    return LatencyReport(
        models={name: str(p) for name, p in paths.items()},
        batch_sizes=batch_sizes,
        machine=_machine_info(provider),
        settings=settings,
        results=results,
        timings_s=timings,
        peak_gflops=peak,
        load_before=load_before,
        load_after=load_after,
        warnings=warns,
    )


def _check_request(models: dict, batch_sizes, device: str, threads=None) -> list[int]:
    """The batch sizes as ints, after refusing an empty model list, bad batch sizes, an unknown device or a
    thread count below 1."""
    if not models:
        raise SurgeryError("no models to compare; pass at least one .onnx file")
    batch_sizes = [int(b) for b in batch_sizes]
    if not batch_sizes or min(batch_sizes) < 1:
        raise SurgeryError(f"batch sizes must be positive integers, got {batch_sizes}")
    if device not in ("cpu", "cuda"):
        raise SurgeryError(f"unknown device {device!r}; use cpu or cuda")
    if threads is not None and int(threads) < 1:
        raise SurgeryError(f"threads must be a positive number of intra-op threads (or None for every core), got {threads}")
    return batch_sizes


@dataclasses.dataclass
class StoppingRule:
    """When interleaved rounds stop (per batch size): after ``min_time_s`` and ``min_rounds``, as soon as every
    ratio's 95% interval is within +-``ci_target``, and at ``max_time_s`` at the latest."""

    min_time_s: float = 5.0
    max_time_s: float = 15.0
    min_rounds: int = 20
    warmup: int = 5
    ci_target: float = 0.01
    seed: int = 0

    def done(self, times: dict[str, list[float]], elapsed: float, next_check: int) -> tuple[bool, int, float | None]:
        """(stop now, round count of the next interval check, widest half-width if it was checked)."""
        names = list(times)
        rounds = len(times[names[0]])
        if rounds < self.min_rounds or elapsed < self.min_time_s:
            return False, next_check, None
        if elapsed >= self.max_time_s or len(names) == 1:
            return True, next_check, None
        if rounds < next_check:
            return False, next_check, None
        # Checking the interval costs a bootstrap, so do it every ~10% more rounds.
        width = max(ratio_ci(times[n], times[names[0]], n_resamples=500, seed=self.seed).half_width
                    for n in names[1:])
        return width <= self.ci_target, rounds + max(5, rounds // 10), width


def _time_batches(sessions, input_names, shape, dtype, batch_sizes, rules: StoppingRule, device, progress):
    """model -> batch -> seconds per run; one seeded input per batch size, shared by every model."""
    rng = np.random.default_rng(rules.seed)
    timings: dict[str, dict[int, list[float]]] = {name: {} for name in sessions}
    for batch in batch_sizes:
        x = rng.standard_normal((batch, *shape[1:])).astype(dtype)
        runners = {name: _runner(s, {input_names[name]: x}, device) for name, s in sessions.items()}
        for name, t in _time_rounds(runners, rules, rng, desc=f"batch {batch}", progress=progress).items():
            timings[name][batch] = t
    return timings


def _time_rounds(runners, rules: StoppingRule, rng, *, desc: str, progress: bool) -> dict[str, list[float]]:
    """Warm-up, then interleaved rounds in shuffled order until ``rules`` says stop; returns seconds per run."""
    names = list(runners)
    for _ in range(rules.warmup):
        for name in names:
            runners[name]()
    times = {name: [] for name in names}
    order, next_check = list(names), rules.min_rounds
    start = time.perf_counter()
    with tqdm(desc=desc, unit="round", disable=not progress, leave=False) as bar:
        while True:
            rng.shuffle(order)
            for name in order:
                t0 = time.perf_counter()
                runners[name]()
                times[name].append(time.perf_counter() - t0)
            bar.update(1)
            stop, next_check, width = rules.done(times, time.perf_counter() - start, next_check)
            if width is not None:
                bar.set_postfix(ci=f"+-{100 * width:.1f}%")
            if stop:
                return times


def result_rows(timings, batch_sizes: list[int], macs: dict, peak: float | None, seed: int, quantized=frozenset()):
    """One row per (batch, model): summary, ratio against the first model, compute; and interval warnings.
    ``quantized`` models get no '% peak': the float32 matmul peak does not bound int8 arithmetic."""
    names = list(timings)
    results, warns = [], []
    for batch in batch_sizes:
        for name in names:
            row = {"model": name, "batch": batch, **summarize(timings[name][batch], batch)}
            row.update(ratio=1.0, ratio_low=1.0, ratio_high=1.0)
            if name != names[0]:
                ci = ratio_ci(timings[name][batch], timings[names[0]][batch], seed=seed)
                row.update(ratio=ci.ratio, ratio_low=ci.low, ratio_high=ci.high)
                if ci.half_width > CI_WARN:
                    warns.append(
                        f"the 95% interval of {name} / {names[0]} at batch {batch} is +-{100 * ci.half_width:.1f}% "
                        f"(wider than +-{100 * CI_WARN:.0f}%); use a longer --min-time or a quieter machine"
                    )
            gflops = 2 * macs[name] * batch / (row["p50_ms"] / 1e3) / 1e9 if macs[name] else None
            fraction = gflops / peak if gflops and peak and name not in quantized else None
            row.update(macs=macs[name], gflops=gflops, peak_fraction=fraction)
            results.append(row)
    if any(r["peak_fraction"] and r["peak_fraction"] > 1 for r in results):
        warns.append(
            "a model ran faster than the measured matmul peak: the peak measurement was disturbed (busy "
            "machine) or too small (raise peak_matmul_n); read '% peak' as approximate"
        )
    return results, warns


def _load_warnings(load_before: list[float], load_after: list[float]) -> list[str]:
    cores = os.cpu_count() or 1
    return [
        f"the machine was busy {when} the run (1-minute load average {load[0]:.2f} on {cores} cores); "
        "timings may be noisy and slower than on an idle machine"
        for when, load in (("before", load_before), ("after", load_after))
        if load[0] > BUSY_LOAD * cores
    ]


def _make_session(model: Path | bytes, threads: int, device: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Without this, each idle session's threads spin on the cores the timed session needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SurgeryError(
                "--device cuda needs onnxruntime-gpu with the CUDA execution provider; this onnxruntime has "
                f"{ort.get_available_providers()} (pip install onnxruntime-gpu, or use --device cpu)"
            )
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(
            model if isinstance(model, bytes) else str(model), sess_options=options, providers=providers
        )
    except Exception as e:
        raise SurgeryError(
            f"onnxruntime cannot load {model if isinstance(model, Path) else 'the model'}: {str(e).strip().splitlines()[0][:300]}"
        ) from e


def _runner(session: ort.InferenceSession, feed: dict[str, np.ndarray], device: str):
    """A no-argument callable that runs the model once on ``feed``."""
    if device == "cpu":
        return lambda: session.run(None, feed)
    # IO binding keeps inputs and outputs on the GPU, so only the model's own work is timed.
    binding = session.io_binding()
    for name, value in feed.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for out in session.get_outputs():
        binding.bind_output(out.name, "cuda")

    def run():
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return run


def _check_models(paths: dict[str, Path], batch_sizes: list[int]):
    """Validate the files: all ONNX, one input each, the same input shape, batch sizes they can take; also
    their stored MACs and which of them are int8 (each file parsed once)."""
    infos, file_macs, quantized = {}, {}, set()
    for name, path in paths.items():
        proto = load_onnx_header(path)
        infos[name] = input_info(proto, path)
        file_macs[name] = stored_macs(proto)
        if is_quantized(proto):
            quantized.add(name)
    first = next(iter(paths))
    _, shape, dtype = infos[first]
    for name, (_, other, other_dtype) in infos.items():
        if other[1:] != shape[1:] or other_dtype != dtype:
            raise SurgeryError(
                f"input shapes differ: {paths[first]} takes {_shape_text(shape, dtype)} but {paths[name]} takes "
                f"{_shape_text(other, other_dtype)}; export every model with the same --input-size"
            )
    for name, (_, other, _) in infos.items():
        if not other or any(not isinstance(d, int) for d in other[1:]):
            raise SurgeryError(
                f"{paths[name]} has input shape {other}: only the batch axis may be dynamic; export it with a "
                "fixed --input-size"
            )
        if isinstance(other[0], int) and any(b != other[0] for b in batch_sizes):
            raise SurgeryError(
                f"{paths[name]} has a fixed batch size of {other[0]} but batch sizes {batch_sizes} were asked "
                "for; export it without --static-batch or use --batch " + str(other[0])
            )
    return {name: info[0] for name, info in infos.items()}, shape, dtype, file_macs, quantized


def _shape_text(shape, dtype) -> str:
    return "[" + ", ".join(str(d) for d in shape) + f"] {np.dtype(dtype).name}"


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine_info(provider: str) -> dict:
    return {
        "cpu": _cpu_model(),
        "cpu_extensions": cpu_extensions(),  # AVX2 / AVX-512 / VNNI / BF16 / AMX: what int8 and fp32 kernels use
        "cores": os.cpu_count(),
        "usable_cores": _usable_cores(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "provider": provider,
        "numpy": np.__version__,
        "torch": torch.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
