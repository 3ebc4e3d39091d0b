"""Statistics of latency timings: pure functions on arrays of seconds per run."""

from __future__ import annotations

import dataclasses

import numpy as np

from ..arguments import checked_arguments
from ..errors import SurgeryError

__all__ = ["CI_WARN", "RatioCI", "ratio_ci", "result_rows", "summarize"]

CI_WARN = 0.03  # warn when a ratio's 95% interval is wider than +-3%


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
        """Whether ``value`` lies in the interval.

        Args:
            value: a ratio.

        Returns:
            low <= value <= high.
        """
        return self.low <= value <= self.high


@checked_arguments
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

    Args:
        a: timings of the model compared.
        b: timings of the baseline.
        paired: a[i] and b[i] come from the same round, so resample round indices and keep pairs together;
            otherwise resample each array on its own.
        confidence: the interval's coverage.
        n_resamples: bootstrap resamples.
        seed: seed of the resampling.

    Returns:
        The ratio and its interval.

    Raises:
        SurgeryError: ``a`` or ``b`` is empty, not one-dimensional, not positive finite numbers, paired
            timings of different lengths, ``confidence`` outside (0, 1), ``n_resamples`` outside 1 to 10^6 or a negative
            ``seed``.
        TypeError: ``paired``, ``confidence``, ``n_resamples`` or ``seed`` of the wrong type.
    """
    try:
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    except (TypeError, ValueError):
        raise SurgeryError("ratio_ci takes two sequences of timings (numbers)") from None
    if a.ndim != 1 or b.ndim != 1 or a.size == 0 or b.size == 0:
        raise SurgeryError(f"ratio_ci needs two 1-D arrays of at least one timing, got shapes {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all() and (a > 0).all() and (b > 0).all()):
        raise SurgeryError("ratio_ci's timings must be positive finite numbers of seconds")
    if paired and a.shape != b.shape:
        raise SurgeryError(f"paired timings must have the same length, got {a.size} and {b.size}")
    if not 0 < confidence < 1 or not 1 <= n_resamples <= 10**6 or seed < 0:
        raise SurgeryError(f"ratio_ci needs 0 < confidence < 1, n_resamples from 1 to 10^6 and seed >= 0, got "
                           f"{confidence}, {n_resamples} and {seed}")
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, a.size, size=(n_resamples, a.size))
    ib = ia if paired else rng.integers(0, b.size, size=(n_resamples, b.size))
    ratios = np.median(a[ia], axis=1) / np.median(b[ib], axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return RatioCI(float(np.median(a) / np.median(b)), float(low), float(high), confidence)


def summarize(times_s, batch: int) -> dict:
    """Latency percentiles (ms) and throughput of one model at one batch size.

    Args:
        times_s: seconds per run.
        batch: images per run.

    Returns:
        n, p50/p90/p99/mean/std/min in ms, and images_per_s (batch / median).
    """
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


def result_rows(timings, batch_sizes: list[int], macs: dict, peak: float | None, seed: int, quantized=frozenset()):
    """One row per (batch, model): summary, ratio against the first model, compute; and interval warnings.

    Args:
        timings: model -> batch -> seconds per run; the first model is the baseline.
        batch_sizes: the batch sizes timed.
        macs: model -> MACs per image (None when unknown).
        peak: the machine's measured float32 GFLOP/s, or None.
        seed: seed of the bootstrap.
        quantized: models that get no '% peak': the float32 matmul peak does not bound int8 arithmetic.

    Returns:
        (rows, warnings).
    """
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
            "a model ran faster than the measured matmul peak: the peak measurement was disturbed (a busy "
            "machine: rerun on an idle one) or too short to reach the machine's peak; read '% peak' as approximate"
        )
    return results, warns
