import importlib
import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from torch import nn

from resnet_surgery import SurgeryError
from resnet_surgery.cli import main
from resnet_surgery.deploy.export import export_onnx
from resnet_surgery.deploy.latency import LatencyReport, StoppingRule, compare_latency
from resnet_surgery.deploy.stats import ratio_ci, result_rows, summarize

FAST = {"min_time_s": 0.05, "min_rounds": 5, "warmup": 1, "peak_matmul_n": 128, "progress": False}


# --- statistics on synthetic timings -------------------------------------------------------------


def synthetic(n: int, median_s: float, seed: int, spread: float = 0.05) -> np.ndarray:
    """Right-skewed timings like a real latency distribution: lognormal around ``median_s``."""
    return median_s * np.random.default_rng(seed).lognormal(0.0, spread, n)


def test_ratio_ci_finds_a_known_ten_percent_difference():
    base = synthetic(300, 0.010, seed=1)
    slower = synthetic(300, 0.011, seed=2)
    ci = ratio_ci(slower, base)
    assert ci.covers(1.10) and not ci.covers(1.0)
    assert abs(ci.ratio - 1.10) < 0.02 and ci.half_width < 0.03
    inverse = ratio_ci(base, slower)
    assert inverse.covers(1 / 1.10) and inverse.high < 1


def test_ratio_ci_of_identical_distributions_covers_one():
    for seed in range(5):
        a, b = synthetic(200, 0.02, seed=seed), synthetic(200, 0.02, seed=100 + seed)
        assert ratio_ci(a, b, seed=seed).covers(1.0)
        assert ratio_ci(a, b, paired=False, seed=seed).covers(1.0)
    same = synthetic(50, 0.02, seed=7)
    ci = ratio_ci(same, same)
    assert ci.ratio == ci.low == ci.high == 1.0


def test_pairing_removes_drift_that_hits_both_models():
    # The machine slows down by up to 30% during the run; B is 5% slower than A in every round.
    drift = np.linspace(1.0, 1.3, 400)
    a = drift * synthetic(400, 0.010, seed=3, spread=0.01)
    b = 1.05 * drift * synthetic(400, 0.010, seed=4, spread=0.01)
    paired, unpaired = ratio_ci(b, a), ratio_ci(b, a, paired=False)
    assert paired.covers(1.05) and unpaired.covers(1.05)
    assert paired.half_width < unpaired.half_width / 2


def test_ratio_ci_rejects_bad_input():
    from resnet_surgery.errors import SurgeryError

    for args, kwargs, needle in ((([1.0, 2.0], [1.0]), {}, "same length"), (([], [1.0]), {}, "at least one"),
                                 (([[1.0]], [[1.0]]), {}, "1-D"), (([1.0], [0.0]), {}, "positive finite"),
                                 ((["a"], [1.0]), {}, "sequences of timings"),
                                 (([1.0], [1.0]), {"confidence": 1.5}, "0 < confidence < 1"),
                                 (([1.0], [1.0]), {"n_resamples": 0}, "n_resamples from 1 to")):
        with pytest.raises(SurgeryError, match=needle):  # found by a review: numpy's own errors came through
            ratio_ci(*args, **kwargs)


def test_summarize_percentiles_and_throughput():
    s = summarize(np.arange(1, 101) / 1000, batch=8)  # 1..100 ms
    assert s["n"] == 100 and s["min_ms"] == pytest.approx(1.0)
    assert s["p50_ms"] == pytest.approx(50.5) and s["p90_ms"] == pytest.approx(90.1)
    assert s["p99_ms"] == pytest.approx(99.01) and s["mean_ms"] == pytest.approx(50.5)
    assert s["images_per_s"] == pytest.approx(8 / 0.0505)


def test_results_rows_from_known_timings():
    # b takes exactly 1.25 x a's time in every round; 10 ms for a at batch 2 with 5 M MACs per image.
    a = synthetic(40, 0.010, seed=5)
    timings = {"a": {2: list(a)}, "b": {2: list(1.25 * a)}}
    rows, warns = result_rows(timings, [2], {"a": 5_000_000, "b": None}, peak=4.0, seed=0)
    first, second = rows
    assert first["ratio"] == 1.0 and second["ratio"] == pytest.approx(1.25)
    assert second["ratio_low"] == pytest.approx(1.25) and second["ratio_high"] == pytest.approx(1.25)
    median_s = float(np.median(a))
    assert first["gflops"] == pytest.approx(2 * 5e6 * 2 / median_s / 1e9) and 1.9 < first["gflops"] < 2.1
    assert first["peak_fraction"] == pytest.approx(first["gflops"] / 4.0)
    assert second["gflops"] is None and second["peak_fraction"] is None and warns == []
    rows, warns = result_rows(timings, [2], {"a": 5_000_000, "b": None}, peak=1.0, seed=0)
    assert any("faster than the measured matmul peak" in w for w in warns)
    # An int8 model is not bounded by the float32 peak: no '% peak', no warning.
    rows, warns = result_rows(timings, [2], {"a": 5_000_000, "b": None}, peak=1.0, seed=0, quantized={"a"})
    assert rows[0]["gflops"] and rows[0]["peak_fraction"] is None and warns == []


def rounds(n: int, *medians: float, spread: float = 0.05) -> dict[str, list[float]]:
    return {f"m{i}": list(synthetic(n, m, seed=i, spread=spread)) for i, m in enumerate(medians)}


def test_stopping_rule_waits_for_the_minimums():
    rule = StoppingRule(min_time_s=1.0, max_time_s=3.0, min_rounds=20, ci_target=0.5)
    assert rule.done(rounds(10, 0.01, 0.01), elapsed=2.0, next_check=20)[0] is False  # too few rounds
    assert rule.done(rounds(30, 0.01, 0.01), elapsed=0.5, next_check=20)[0] is False  # too little time
    assert rule.done(rounds(30, 0.01), elapsed=1.0, next_check=20)[0] is True  # one model: nothing to compare


def test_stopping_rule_stops_at_a_narrow_interval_or_at_max_time():
    rule = StoppingRule(min_time_s=0.0, max_time_s=10.0, min_rounds=20, ci_target=0.01)
    stop, next_check, width = rule.done(rounds(100, 0.01, 0.011, spread=0.001), elapsed=1.0, next_check=20)
    assert stop is True and width < 0.01 and next_check == 110
    stop, next_check, width = rule.done(rounds(100, 0.01, 0.011, spread=0.5), elapsed=1.0, next_check=20)
    assert stop is False and width > 0.01 and next_check == 110
    # Between checks no bootstrap runs; at max_time_s the run stops however wide the interval.
    assert rule.done(rounds(100, 0.01, 0.011, spread=0.5), elapsed=1.0, next_check=110) == (False, 110, None)
    assert rule.done(rounds(100, 0.01, 0.011, spread=0.5), elapsed=10.0, next_check=110) == (True, 110, None)


def test_import_and_method_survive_python_OO():
    code = "import resnet_surgery, resnet_surgery.cli, resnet_surgery.deploy.latency as l; print(l.METHOD.split()[1])"
    out = subprocess.run([sys.executable, "-OO", "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "One", out.stderr


# --- the report on real (tiny) ONNX models -------------------------------------------------------


def tiny_net(channels: int, size_out: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, 2, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, size_out),
    )


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    paths = {}
    for name, channels, size, dynamic in [
        ("small", 4, 24, True),
        ("big", 32, 24, True),
        ("other_size", 4, 20, True),
        ("static", 4, 24, False),
    ]:
        paths[name] = folder / f"{name}.onnx"
        export_onnx(tiny_net(channels), paths[name], input_size=(3, size, size), dynamic_batch=dynamic)
    return paths


def test_report_structure(onnx_models, tmp_path, monkeypatch):
    models = {"small": onnx_models["small"], "big": onnx_models["big"]}
    report = compare_latency(models, batch_sizes=(1, 2), threads=1, **FAST)
    assert isinstance(report, LatencyReport)
    assert [(r["model"], r["batch"]) for r in report.results] == [
        ("small", 1),
        ("big", 1),
        ("small", 2),
        ("big", 2),
    ]
    for r in report.results:
        assert r["n"] >= 5 and 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["ratio_low"] <= r["ratio"] <= r["ratio_high"]
        assert r["gflops"] > 0 and r["peak_fraction"] > 0
    # MACs come from the metadata export_onnx wrote: a 3x3 stride-2 conv to 12 x 12 x C, then a C x 10 linear.
    assert {r["model"]: r["macs"] for r in report.results} == {"small": 144 * 4 * 27 + 40, "big": 144 * 32 * 27 + 320}
    assert report.results[0]["ratio"] == 1.0
    # Interleaved rounds: every model ran the same number of times at each batch size.
    for batch in (1, 2):
        assert len(report.timings_s["small"][batch]) == len(report.timings_s["big"][batch])
    # Ratios against any model come from the same paired rounds.
    assert report.ratio("small", "big", 2).ratio == pytest.approx(1 / report.results[3]["ratio"])
    assert report.machine["onnxruntime"] == ort.__version__
    assert report.machine["provider"] == "CPUExecutionProvider" and report.machine["cores"] >= 1
    assert report.settings["threads"] == 1 and report.settings["allow_spinning"] == 0
    assert len(report.load_before) == len(report.load_after) == 3
    assert "interleaved rounds" in report.method

    d = json.loads(json.dumps(report.to_dict()))
    assert set(d) >= {"models", "machine", "results", "timings_s", "peak_gflops", "load_before", "warnings"}
    text = str(report)
    assert "ratio vs small" in text and "1 (baseline)" in text and "load average" in text

    png = report.plot(tmp_path / "latency.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with pytest.raises(SurgeryError, match="already exists"):
        report.plot(png, force=False)
    # The title: "1 thread" (not "1 threads"), on short lines that fit the figure (one long line was cut off).
    latency_module = importlib.import_module("resnet_surgery.deploy.latency")

    titles = []
    monkeypatch.setattr(latency_module, "plot_latency", lambda timings, batches, title, path, force: titles.append(title))
    report.plot(tmp_path / "again.png")
    assert ", 1 thread\n" in titles[0] and "threads" not in titles[0]
    assert all(len(line) <= 90 for line in titles[0].splitlines()), titles[0]


def test_given_macs_override_the_file_and_busy_machine_warns(onnx_models, monkeypatch):
    monkeypatch.setattr("os.getloadavg", lambda: (1000.0, 1000.0, 1000.0))
    report = compare_latency({"small": onnx_models["small"]}, macs={"small": 10**9}, **FAST)
    assert report.results[0]["macs"] == 10**9
    assert any("busy" in w for w in report.warnings)
    assert "warning: the machine was busy" in str(report)


def test_wide_interval_warns(onnx_models, monkeypatch):
    stats = importlib.import_module("resnet_surgery.deploy.stats")

    monkeypatch.setattr(stats, "CI_WARN", 0.0)
    report = compare_latency({"a": onnx_models["small"], "b": onnx_models["big"]}, **FAST)
    assert any("95% interval of b / a at batch 1" in w for w in report.warnings)


def test_bad_inputs_are_clear_errors(onnx_models, tmp_path):
    with pytest.raises(SurgeryError, match="no such ONNX file"):
        compare_latency({"a": onnx_models["small"], "b": tmp_path / "missing.onnx"}, **FAST)
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    with pytest.raises(SurgeryError, match="is not an ONNX model"):
        compare_latency({"a": onnx_models["small"], "b": bad}, **FAST)
    with pytest.raises(
        SurgeryError, match=r"input shapes differ.*\[batch, 3, 24, 24\].*\[batch, 3, 20, 20\]"
    ):
        compare_latency({"a": onnx_models["small"], "b": onnx_models["other_size"]}, **FAST)
    with pytest.raises(SurgeryError, match="fixed batch size of 1"):
        compare_latency({"a": onnx_models["small"], "b": onnx_models["static"]}, batch_sizes=(1, 8), **FAST)
    with pytest.raises(SurgeryError, match="no models"):
        compare_latency({}, **FAST)
    with pytest.raises(SurgeryError, match="positive"):
        compare_latency({"a": onnx_models["small"]}, batch_sizes=(0,), **FAST)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA provider present")
def test_cuda_without_the_cuda_provider_says_how_to_get_it(onnx_models):
    with pytest.raises(SurgeryError, match="onnxruntime-gpu"):
        compare_latency({"a": onnx_models["small"]}, device="cuda", **FAST)


# --- CLI -----------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def quick_peak(request, monkeypatch):
    """The CLI measures the peak with 2048 x 2048 matmuls; its tests need not."""
    if request.node.name.startswith("test_cli"):
        latency = importlib.import_module("resnet_surgery.deploy.latency")

        monkeypatch.setattr(latency, "measure_peak_gflops", lambda *args, **kwargs: 50.0)


def run_bench(*args):
    return CliRunner().invoke(main, ["bench", *map(str, args)])


def test_cli_bench_table_json_and_plot(onnx_models, tmp_path):
    plot = tmp_path / "latency.png"
    result = run_bench(
        onnx_models["small"],
        onnx_models["big"],
        "--batch",
        "1,2",
        "--threads",
        "1",
        "--min-time",
        "0.05",
        "--plot",
        plot,
    )
    assert result.exit_code == 0, result.output
    assert "ratio vs small" in result.stdout and plot.stat().st_size > 0
    result = run_bench(
        onnx_models["small"], onnx_models["big"], "--min-time", "0.05", "--plot", plot, "--json"
    )
    assert result.exit_code == 2 and "already exists" in result.stderr
    result = run_bench(onnx_models["small"], onnx_models["big"], "--min-time", "0.05", "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert list(d["models"]) == ["small", "big"] and d["batch_sizes"] == [1]


def one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_bench_bad_inputs(onnx_models, tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("hello")
    one_line_error(
        run_bench(onnx_models["small"], tmp_path / "missing.onnx"), "no such ONNX file", "missing.onnx"
    )
    one_line_error(run_bench(onnx_models["small"], bad), "notes.onnx is not an ONNX model")
    one_line_error(run_bench(onnx_models["small"], onnx_models["other_size"]), "input shapes differ")
    one_line_error(run_bench(onnx_models["small"], onnx_models["small"]), "same file is given twice")
    result = run_bench(onnx_models["small"], "--batch", "1,x")
    assert result.exit_code == 2 and "comma-separated list of positive integers" in result.output
