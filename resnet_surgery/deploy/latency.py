"""Compare the inference latency of ONNX models in onnxruntime, with numbers a performance engineer can defend.

The method is ``METHOD`` below; every report quotes it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..arguments import checked_arguments, with_overrides
from ..defaults import MAX_BATCH
from ..errors import SurgeryError
from ..utils import check_argument
from .cpu import weight_range_warning
from .machine import load_warnings, machine_info, measure_peak_gflops, usable_cores
from .onnxfile import QUANT_METADATA_KEY, input_info, is_quantized, load_onnx_header, metadata, stored_macs
from .plot import plot_latency
from .runtime import onnx_session, onnxruntime_errors, runner
from .stats import RatioCI, ratio_ci, result_rows

MAX_THREADS = 4096  # onnxruntime takes a C int; no machine has more cores than this
MAX_ROUNDS = 10**6  # rounds or warm-up runs: beyond any timing anyone waits for

__all__ = ["METHOD", "LatencyOptions", "LatencyReport", "StoppingRule", "check_batch_sizes", "compare_latency"]
# A constant, not parsed from the docstring: `python -OO` strips docstrings.
METHOD = """\
- One onnxruntime ``InferenceSession`` per model, all with the same ``SessionOptions``: graph
  optimisation level ``ORT_ENABLE_ALL``, ``intra_op_num_threads`` = the thread count asked for (default:
  every core this process may use), ``inter_op_num_threads`` = 1, sequential execution, and
  ``session.intra_op.allow_spinning`` = 0 so that idle sessions do not spin on cores the timed one needs.
- Every model gets the same input: one seeded standard-normal batch per batch size.
- Each model runs once per batch size first (a file that loads but does not run is an error naming it),
  then warm-up runs (``warmup`` per model and batch size); all are discarded.
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
        """Paired ratio of medians between any two models of this run (e.g. pruned v1 against v1).

        Args:
            model: the model compared.
            baseline: the model it is compared with.
            batch: the batch size.
            **kwargs: passed to `ratio_ci`.

        Returns:
            The ratio and its interval.
        """
        return ratio_ci(self.timings_s[model][batch], self.timings_s[baseline][batch], **kwargs)

    def to_dict(self) -> dict:
        """The report as JSON-ready data (batch sizes as string keys in ``timings_s``).

        Returns:
            A dict.
        """
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
        """Write a PNG of the latency distributions: one box per model, one panel per batch size.

        Args:
            path: the PNG to write.
            force: overwrite ``path`` if it exists.

        Returns:
            ``path``.
        """
        m = self.machine
        threads = self.settings["threads"]
        # Three short lines: one long line was cut off at the figure's edge.
        title = (f"onnxruntime {m['onnxruntime']} {m['provider']}, {threads} thread{'s' if threads != 1 else ''}\n"
                 f"{m['cpu']}\nbox: quartiles and median; whiskers: p1-p99")
        return plot_latency(self.timings_s, self.batch_sizes, title, path, force=force)


# --- the measurement ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LatencyOptions:
    """How `compare_latency` times the models (``METHOD`` says how these settings are used).

    Args:
        batch_sizes: batch sizes to time (an int: one).
        threads: intra-op threads (None: every usable core).
        min_time_s: seconds of timing per batch size (all models together), at least.
        max_time_s: seconds per batch size at most (None: 3 x min_time_s).
        min_rounds: interleaved rounds, at least.
        warmup: discarded runs per model and batch size.
        ci_target: stop once every ratio's 95% interval is within +- this.
        seed: seed of the inputs, the order of the rounds and the bootstrap.
        device: "cpu" or "cuda".
        peak_matmul_n: side of the matrices that measure the machine's peak.
    """

    batch_sizes: Sequence[int] | int = (1,)
    threads: int | None = None
    min_time_s: float = 5.0
    max_time_s: float | None = None
    min_rounds: int = 20
    warmup: int = 5
    ci_target: float = 0.01
    seed: int = 0
    device: str = "cpu"
    peak_matmul_n: int = 2048


@checked_arguments
def compare_latency(models: dict[str, str | os.PathLike], *, options: LatencyOptions | None = None,
                    macs: dict[str, int] | None = None, progress: bool = True, **overrides) -> LatencyReport:
    """Time ONNX models in interleaved rounds and compare each with the first (method: ``METHOD``).

    Args:
        models: name -> .onnx file, in order; the first is the baseline.
        options: how to time them (`LatencyOptions`); None: its defaults.
        macs: multiply-accumulates per image by model name; missing ones are read from the file's metadata.
        progress: show progress bars.
        **overrides: `LatencyOptions` fields, e.g. ``compare_latency(models, batch_sizes=(1, 8), threads=1)``.

    Returns:
        The report.

    Raises:
        SurgeryError: no models, a file that is missing or not a readable ONNX model, models whose inputs
            differ, bad batch sizes, threads, seed or device, or onnxruntime failing to run a model.
        TypeError: an argument or options field of the wrong type, or an unknown field.
    """
    o = with_overrides(LatencyOptions, options, overrides, "compare_latency()")
    batch_sizes = _check_request(models, o)
    threads, device, seed, peak_matmul_n = int(o.threads) if o.threads else usable_cores(), o.device, o.seed, o.peak_matmul_n
    max_time_s = 3 * o.min_time_s if o.max_time_s is None else max(o.max_time_s, o.min_time_s)
    rules = StoppingRule(o.min_time_s, max_time_s, o.min_rounds, o.warmup, o.ci_target, seed)
    paths = {name: Path(p) for name, p in models.items()}
    input_names, shape, dtype, file_macs, quantized, range_warns = _check_models(paths, batch_sizes)
    macs = {name: (macs or {}).get(name, file_macs[name]) for name in paths}

    load_before = list(os.getloadavg())
    sessions = {name: onnx_session(p, threads=threads, timing=True, device=device) for name, p in paths.items()}
    peak = measure_peak_gflops(threads, n=peak_matmul_n, device=device)
    timings = _time_batches(sessions, input_names, shape, dtype, batch_sizes, rules, device, progress)
    # Measured again after the timing: the better of the two is less disturbed by other processes.
    peak = max(peak, measure_peak_gflops(threads, n=peak_matmul_n, device=device))
    load_after = list(os.getloadavg())

    results, warns = result_rows(timings, batch_sizes, macs, peak, seed, quantized)
    warns += load_warnings(load_before, load_after) + range_warns
    provider = next(iter(sessions.values())).get_providers()[0]
    return LatencyReport(models={name: str(p) for name, p in paths.items()}, batch_sizes=batch_sizes,
                         machine=machine_info(provider), settings=_settings(threads, device, rules, shape),
                         results=results, timings_s=timings, peak_gflops=peak, load_before=load_before,
                         load_after=load_after, warnings=warns)


def _settings(threads: int, device: str, rules: StoppingRule, shape: list) -> dict:
    """The settings a report quotes: the sessions' (as runtime.onnx_session(timing=True) makes them), the rule's."""
    return {
        "threads": threads,
        "inter_op_threads": 1,
        "graph_optimization": "ORT_ENABLE_ALL",
        "allow_spinning": 0,
        "device": device,
        **dataclasses.asdict(rules),
        "bootstrap": "paired percentile, 2000 resamples, 95%",
        "input_shape": ["batch", *shape[1:]],
    }


def _check_request(models: dict, o: LatencyOptions) -> list[int]:
    """The batch sizes as ints, after refusing an empty model list, bad batch sizes, an unknown device, a
    thread count below 1, a negative seed or timing settings out of range."""
    check_argument(models, "models", dict, "a dict {name: .onnx path}, the first being the baseline")
    if o.seed < 0:  # numpy's generators take none
        raise SurgeryError(f"compare_latency's seed must be >= 0, not {o.seed}")
    times = [o.min_time_s] + ([] if o.max_time_s is None else [o.max_time_s])
    if not (all(0 <= t < math.inf for t in times) and 0 < o.ci_target < math.inf and 1 <= o.min_rounds <= MAX_ROUNDS
            and 0 <= o.warmup <= MAX_ROUNDS and 1 <= o.peak_matmul_n <= 16384):
        raise SurgeryError(f"compare_latency needs finite times >= 0, ci_target > 0, min_rounds from 1 and warmup "
                           f"from 0 to {MAX_ROUNDS}, peak_matmul_n from 1 to 16384; got min_time_s {o.min_time_s}, "
                           f"max_time_s {o.max_time_s}, ci_target {o.ci_target}, min_rounds {o.min_rounds}, "
                           f"warmup {o.warmup}, peak_matmul_n {o.peak_matmul_n}")
    device, threads, batch_sizes = o.device, o.threads, o.batch_sizes
    if not models:
        raise SurgeryError("no models to compare; pass at least one .onnx file")
    if device not in ("cpu", "cuda"):
        raise SurgeryError(f"unknown device {device!r}; use cpu or cuda")
    return check_batch_sizes(batch_sizes, threads)


def check_batch_sizes(batch_sizes, threads=None) -> list[int]:
    """The batch sizes as ints, after refusing bad ones or a thread count below 1 (explore checks them before
    it builds anything).

    Args:
        batch_sizes: the batch sizes to time.
        threads: intra-op threads, or None.

    Returns:
        The batch sizes as a list of ints.
    """
    if isinstance(batch_sizes, int) and not isinstance(batch_sizes, bool):
        batch_sizes = [batch_sizes]
    if (isinstance(batch_sizes, str | bytes) or not hasattr(batch_sizes, "__iter__")
            or not all(isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in batch_sizes)):
        raise SurgeryError(f"batch sizes must be positive integers, got {batch_sizes!r:.80}")
    batch_sizes = [int(b) for b in batch_sizes]
    if not batch_sizes or min(batch_sizes) < 1 or max(batch_sizes) > MAX_BATCH:
        raise SurgeryError(f"batch sizes must be positive integers up to {MAX_BATCH}, got {batch_sizes}")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= MAX_THREADS):
        raise SurgeryError(f"threads must be a number of intra-op threads from 1 to {MAX_THREADS} (or None for every "
                           f"core), got {threads}")
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
        """Whether to stop after the rounds so far.

        Args:
            times: model -> seconds per run, one per round; the first model is the baseline.
            elapsed: seconds since the rounds began.
            next_check: the round count at which the interval is checked next.

        Returns:
            (stop now, round count of the next interval check, widest half-width if it was checked).
        """
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
        runners = {name: runner(s, {input_names[name]: x}, device) for name, s in sessions.items()}
        for name, run in runners.items():  # run once first (discarded): a file that loads but does not run is one error
            with onnxruntime_errors(f"run {name} at batch {batch}"):
                run()
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


def _check_models(paths: dict[str, Path], batch_sizes: list[int]):
    """Validate the files: all ONNX, one input each, the same input shape, batch sizes they can take; also
    their stored MACs and which of them are int8 (each file parsed once)."""
    infos, file_macs, quantized, range_warns = {}, {}, set(), []
    for name, path in paths.items():
        proto = load_onnx_header(path)
        infos[name] = input_info(proto, path)
        file_macs[name] = stored_macs(proto)
        if is_quantized(proto):
            quantized.add(name)
            record = metadata(proto).get(QUANT_METADATA_KEY)
            warning = weight_range_warning(json.loads(record) if record else None, str(path))
            range_warns += [warning] if warning else []
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
    return {name: info[0] for name, info in infos.items()}, shape, dtype, file_macs, quantized, range_warns


def _shape_text(shape, dtype) -> str:
    return "[" + ", ".join(str(d) for d in shape) + f"] {np.dtype(dtype).name}"
