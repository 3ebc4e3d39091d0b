"""benchmarks/bench_cost.py's arithmetic: the from-scratch curve's CPU seconds and the headline, on hand-made numbers."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cost.py"
spec = importlib.util.spec_from_file_location("bench_cost", SCRIPT)
bench_cost = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_cost)

# Two cycles, as train_cifar records them: elapsed_s restarts at each cycle, and each ran at its own threads.
TRAIN = {"threads": 2, "runs": {"v1.5": {"test_top1": 85.0, "cycles": [
    {"epochs": 2, "wall_s": 100.0, "hyper_parameters": {"threads": 1},
     "history": [{"epoch": 1, "test_top1": 60.0, "elapsed_s": 50.0}, {"epoch": 2, "test_top1": 70.0, "elapsed_s": 100.0}]},
    {"epochs": 2, "wall_s": 200.0, "hyper_parameters": {"threads": 2},
     "history": [{"epoch": 1, "test_top1": 84.8, "elapsed_s": 100.0}, {"epoch": 2, "test_top1": 85.0, "elapsed_s": 200.0}]},
]}}}


def test_scratch_curve_accumulates_cycles_at_their_threads():
    curve = bench_cost.scratch_curve(TRAIN, "v1.5")
    assert curve["cpu_seconds"] == 100.0 * 1 + 200.0 * 2
    assert [p["cpu_seconds"] for p in curve["points"]] == [50.0, 100.0, 300.0, 500.0]
    assert [p["epoch"] for p in curve["points"]] == [1, 2, 3, 4]
    assert curve["points"][-1]["percent"] == pytest.approx(100.0)
    assert not curve["stand_in"]
    # d was never trained from scratch: v1.5's curve stands in, and says so.
    d = bench_cost.scratch_curve(TRAIN, "d")
    assert d["layout"] == "v1.5" and d["stand_in"]


def points(*rows):
    return [{"step": s, "budget": b, "top1": t, "cpu_seconds": c, "percent": c / 5.0} for s, b, t, c in rows]


def test_headline_finds_the_cheapest_point_within_and_matching():
    scratch = bench_cost.scratch_curve(TRAIN, "v1.5")  # 500 CPU s = 100%
    pts = points(("original", "", 85.0, 0), ("naive copy", "0", 70.0, 0), ("calibration", "", 84.0, 20),
                 ("features", "2000 steps", 84.7, 45),  # exactly 0.3 below, at 9%: counts as within
                 ("finetune", "0.25 epoch", 84.9, 40),  # cheaper and within
                 ("finetune", "1 epoch", 85.1, 200))
    h = bench_cost.headline(pts, 85.0, scratch)
    assert (h["within"]["step"], h["within"]["cpu_seconds"]) == ("finetune", 40)
    assert (h["match"]["budget"], h["match"]["percent"]) == ("1 epoch", 40.0)
    assert h["goal"]["met"] and h["goal"]["short_by_points"] == 0.0
    assert h["scratch_within"]["cpu_seconds"] == 300.0  # the curve's first epoch at >= 84.7


def test_headline_says_by_how_much_the_goal_is_missed():
    scratch = bench_cost.scratch_curve(TRAIN, "v1.5")
    pts = points(("original", "", 85.0, 0), ("calibration", "", 83.9, 20), ("features", "500 steps", 84.2, 45),
                 ("finetune", "1 epoch", 84.8, 100))  # within, but at 20%
    h = bench_cost.headline(pts, 85.0, scratch)
    assert not h["goal"]["met"]
    assert h["goal"]["within_at_percent"] == 20.0
    assert h["goal"]["best_within_goal"]["budget"] == "500 steps"
    assert h["goal"]["short_by_points"] == pytest.approx(0.5)
    assert h["match"] is None
    lines = bench_cost.headline_lines({"label": "v1 -> d", "headline": h})
    assert "matches the original: not reached within the measured budget" in lines[0]
    assert "NOT MET" in lines[0] and "0.50 point short" in lines[0]


def test_merge_adds_other_budgets_in_order_and_refuses_other_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_cost, "plot", lambda result, path: None)  # the chart is not what is tested
    scratch = bench_cost.scratch_curve(TRAIN, "v1.5")
    settings = {"test_images": 100, "calibration_images": 64, "finetune_images": 500, "bf16": True,
                "feature_steps": [500], "finetune_fractions": [1.0], "seed": 0, "threads": 1}

    def result(rows, **changes):
        pts = [{**p, "vs_original": p["top1"] - 85.0, "agreement": 90.0}
               | ({"steps": int(p["budget"].split()[0])} if p["step"] in bench_cost.LABELLED else {})
               for p in points(*rows)]
        return {"settings": {**settings, **changes}, "cpu_flags": [], "torch": "x", "rewrites": [
            {"rewrite": "v1.5:v1", "label": "v1.5 -> v1", "scratch": scratch, "points": pts, "finished": True,
             "headline": bench_cost.headline(pts, 85.0, scratch)}]}

    main = tmp_path / "cost.json"
    main.write_text(bench_cost.json.dumps(result([("original", "", 85.0, 0), ("calibration", "", 84.0, 20),
                                                  ("features", "500 steps", 84.2, 30), ("finetune", "1 epoch", 84.5, 60)])))
    extra = tmp_path / "extra.json"
    extra.write_text(bench_cost.json.dumps(result([("original", "", 85.0, 0), ("calibration", "", 84.0, 21),
                                                   ("features", "4000 steps", 84.8, 45), ("finetune", "2 epoch", 84.6, 100)],
                                                  feature_steps=[4000], finetune_fractions=[2.0])))
    merged = bench_cost.merge(main, [extra])
    r = merged["rewrites"][0]
    assert [(p["step"], p["budget"]) for p in r["points"]] == [
        ("original", ""), ("calibration", ""), ("features", "500 steps"), ("features", "4000 steps"),
        ("finetune", "1 epoch"), ("finetune", "2 epoch")]
    assert r["headline"]["within"]["budget"] == "4000 steps"  # the new point is the first within 0.3
    assert merged["settings"]["extra_budgets"]["v1.5:v1"] == {"feature_steps": [4000], "finetune_fractions": [2.0]}
    assert bench_cost.json.loads(main.read_text()) == merged and "4000 steps" in main.with_suffix(".md").read_text()
    other = tmp_path / "other.json"
    other.write_text(bench_cost.json.dumps(result([("original", "", 85.0, 0)], seed=1)))
    with pytest.raises(SystemExit, match="other settings"):
        bench_cost.merge(main, [other])


def test_judge_scratch_reads_train_resnet50s_process_cpu_seconds():
    record = {"cpu_s": 400.0, "epochs_done": 2, "test_top1": 88.0,
              "history": [{"epoch": 1, "test_top1": 70.0, "cpu_s": 190.0}, {"epoch": 2, "test_top1": 88.0, "cpu_s": 400.0}]}
    curve = bench_cost.judge_scratch(record, "v1")
    assert [p["percent"] for p in curve["points"]] == [47.5, 100.0] and curve["cpu_seconds"] == 400.0
    assert curve["layout"] == "v1.5" and curve["stand_in"]  # only v1.5 was trained: it stands in for v1
    assert not bench_cost.judge_scratch(record, "v1.5")["stand_in"]
