"""recover: the stages in order to a target within a budget, each judged on held-back images and undone when worse;
a checkpoint after every stage that a killed run resumes from; bad input refused before any work."""

import importlib
import json

import pytest
import torch
from click.testing import CliRunner
from test_recovery import tiny_conversion
from torch.utils.data import TensorDataset

from resnet_surgery import history
from resnet_surgery.cli.app import main
from resnet_surgery.errors import SurgeryError
from resnet_surgery.recovery.budget import expired, time_limit
from resnet_surgery.recovery.calibrate import calibrate
from resnet_surgery.recovery.finetune import finetune
from resnet_surgery.recovery.recover import RecoverOptions, recover

recover_module = importlib.import_module("resnet_surgery.recovery.recover")

FAST = RecoverOptions(eval_images=64, calibrate_images=96, batch_size=32, iterations=20)


def sharp_conversion():
    """tiny_conversion's model with a classifier confident enough that the rewrite changes its answers."""
    original, converted = tiny_conversion("v1")
    with torch.no_grad():
        for model in (original, converted):
            model.fc.weight.mul_(30)
    return original, converted


@pytest.fixture(autouse=True)
def small_rounds(monkeypatch):
    monkeypatch.setattr(recover_module, "FEATURE_STEPS", 8)
    monkeypatch.setattr(recover_module, "MAX_ROUNDS", 2)
    monkeypatch.setattr(recover_module, "MIN_ROUND_STEPS", 2)


def labelled_data(original, n=192, seed=1):
    """Random images labelled with the original's own classes (so its top-1 is 100%)."""
    images = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        labels = original(images).argmax(1)
    return TensorDataset(images, labels)


def quiet(**kw):
    lines = []
    return dict(progress=False, echo=lines.append, **kw), lines


@pytest.mark.slow
def test_the_stages_run_in_order_and_the_model_is_never_worse_than_before():
    original, converted = sharp_conversion()
    before = {k: v.clone() for k, v in converted.state_dict().items()}
    kw, lines = quiet()
    model = recover(converted, original, labelled_data(original), options=FAST, **kw)
    report = history(model).recovery
    stages = [s.stage for s in report.stages]
    assert stages[:3] == ["naive copy", "bn", "calibrate"] and set(stages[3:]) <= {"features", "finetune"}
    assert "finetune" in stages, str(report)  # labels: fine-tuning runs after feature mimicking
    assert stages.index("finetune") > max(i for i, s in enumerate(stages) if s == "features")
    assert report.metric == "top-1" and report.original_top1 == 100.0 and report.eval_images == 64
    kept = [s for s in report.stages if s.kept]
    assert all(b.kl <= a.kl or b.gap < a.gap for a, b in zip(kept, kept[1:])), str(report)
    assert report.gap < report.stages[0].gap  # it recovered something
    assert report.stopped in ("stopped paying", "all stages run") and not report.met
    assert len(lines) == len(report.stages) and lines[1].startswith("recover: bn")
    assert all(s.total_wall_seconds >= s.wall_seconds > 0 for s in report.stages[1:])
    # The converted model is untouched; the returned one keeps its recipe and records the report.
    assert history(model).recipe.recovery["stopped"] == report.stopped
    assert all(torch.equal(a, before[k]) for k, a in converted.state_dict().items())


def test_a_target_already_met_after_batchnorm_stops_there():
    original, converted = sharp_conversion()
    data = labelled_data(original)
    bn_only = history(recover(converted, original, data, options=RecoverOptions(**{**vars(FAST), "stages": ("bn",)}),
                              **quiet()[0])).recovery
    naive, bn = bn_only.stages[0].gap, bn_only.stages[1].gap
    assert bn < naive, str(bn_only)
    kw, _ = quiet()
    report = history(recover(converted, original, data, target=(naive + bn) / 2, options=FAST, **kw)).recovery
    assert [s.stage for s in report.stages] == ["naive copy", "bn"]
    assert report.stopped == "target met" and report.met and report.gap == bn


def test_without_labels_it_judges_agreement_skips_finetuning_and_stops_when_a_stage_stops_paying():
    original, converted = sharp_conversion()
    images = labelled_data(original).tensors[0]
    report = history(recover(converted, original, TensorDataset(images), options=FAST, **quiet()[0])).recovery
    assert report.metric == "agreement" and report.original_top1 is None
    assert "finetune" not in [s.stage for s in report.stages]
    assert report.stopped in ("stopped paying", "all stages run")
    assert all(s.gap == pytest.approx(100 - s.agreement) for s in report.stages)
    # The same with the labels there but ignored.
    options = RecoverOptions(**{**vars(FAST), "labels": False, "stages": ("bn",)})
    report = history(recover(converted, original, labelled_data(original), options=options, **quiet()[0])).recovery
    assert report.metric == "agreement"


def test_a_stage_that_makes_the_model_worse_is_undone(monkeypatch):
    original, converted = sharp_conversion()

    def ruin(run, size):
        model = calibrate(run.model, run.original, run.calib, num_images=None, steps=("bn",), progress=False)
        with torch.no_grad():
            model.fc.weight.mul_(-1)  # every prediction changes
        return model, "ruined"

    monkeypatch.setitem(recover_module._STAGES, "calibrate", ruin)
    options = RecoverOptions(**{**vars(FAST), "stages": ("bn", "calibrate")})
    model = recover(converted, original, labelled_data(original), options=options, **quiet()[0])
    report = history(model).recovery
    assert [(s.stage, s.kept) for s in report.stages] == [("naive copy", True), ("bn", True), ("calibrate", False)]
    assert report.gap == report.stages[1].gap
    assert not torch.equal(model.fc.weight, -converted.fc.weight)


def test_a_killed_run_resumes_after_the_last_finished_stage(tmp_path, monkeypatch):
    original, converted = sharp_conversion()
    data = labelled_data(original)
    checkpoint = tmp_path / "out.recover.pt"
    calls = []
    real = dict(recover_module._STAGES)

    def counting(name, kill=False):
        def stage(run, size):
            calls.append(name)
            if kill:
                raise KeyboardInterrupt  # stands for the kill: nothing after the last checkpoint survives
            return real[name](run, size)
        return stage

    monkeypatch.setitem(recover_module._STAGES, "bn", counting("bn"))
    monkeypatch.setitem(recover_module._STAGES, "calibrate", counting("calibrate", kill=True))
    options = RecoverOptions(**{**vars(FAST), "stages": ("bn", "calibrate")})
    with pytest.raises(KeyboardInterrupt):
        recover(converted, original, data, options=options, checkpoint=checkpoint, **quiet()[0])
    assert checkpoint.is_file() and calls == ["bn", "calibrate"]
    with pytest.raises(SurgeryError, match="--resume"):  # neither resume nor force: refused
        recover(converted, original, data, options=options, checkpoint=checkpoint, **quiet()[0])
    monkeypatch.setitem(recover_module._STAGES, "calibrate", counting("calibrate"))
    model = recover(converted, original, data, options=options, checkpoint=checkpoint, resume=True, **quiet()[0])
    report = history(model).recovery
    assert calls == ["bn", "calibrate", "calibrate"]  # BatchNorm was not run again
    assert [s.stage for s in report.stages] == ["naive copy", "bn", "calibrate"]
    assert not checkpoint.exists()  # the finished run removes it
    # Another run's checkpoint is refused.
    recover_module.save_state(checkpoint, converted, identity={"model": "other"}, position=(1, 0), spent=(1.0, 1.0),
                              stages=report.stages[:1], step_seconds={}, measure_seconds=0.1)
    with pytest.raises(SurgeryError, match="another recover run"):
        recover(converted, original, data, options=options, checkpoint=checkpoint, resume=True, **quiet()[0])


@pytest.mark.parametrize("kwargs, message", [
    ({"target": 0}, "target must be a number > 0"),
    ({"target": float("nan")}, "target must be a number > 0"),
    ({"budget": -5}, "budget must be a number > 0"),
    ({"budget": 1e-6}, "cannot fit one BatchNorm pass"),
    ({"options": RecoverOptions(stages=("bn", "polish"))}, "unknown recover stage 'polish'"),
])
def test_bad_input_is_refused_before_any_work(kwargs, message, monkeypatch, tmp_path):
    original, converted = sharp_conversion()
    monkeypatch.setitem(recover_module._STAGES, "bn", lambda run, size: pytest.fail("a stage ran"))
    with pytest.raises(SurgeryError, match=message):
        recover(converted, original, labelled_data(original), checkpoint=tmp_path / "c.pt", **{"options": FAST, **kwargs},
                **quiet()[0])
    assert not (tmp_path / "c.pt").exists()


def test_labels_beyond_the_model_classes_are_refused(tmp_path):
    from PIL import Image

    original, converted = sharp_conversion()
    for c in range(12):  # the tiny model has 10 classes
        (tmp_path / "data" / f"class{c:02d}").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (20 * c, 10 * i, 0)).save(tmp_path / "data" / f"class{c:02d}" / f"{i}.png")
    options = RecoverOptions(**{**vars(FAST), "eval_images": 8})
    with pytest.raises(SurgeryError, match="12 class folders but the model has 10 classes"):
        recover(converted, original, str(tmp_path / "data"), options=options, **quiet()[0])


def test_an_exact_conversion_has_nothing_to_recover():
    original, converted = tiny_conversion("v1.5", layout="v1", exact=True)
    with pytest.raises(SurgeryError, match="nothing to recover"):
        recover(converted, original, labelled_data(original), options=FAST, **quiet()[0])


def test_the_time_limit_stops_reconstruction_and_finetuning_at_a_step_boundary():
    original, converted = sharp_conversion()
    data = labelled_data(original, n=96)
    assert not expired()
    with time_limit(0):
        assert expired()
        calibrated = calibrate(converted, original, data, num_images=None, steps=("reconstruct",), progress=False)
        trained = finetune(converted, original, data, steps=20, progress=False)
    assert not expired()
    assert history(calibrated).calibration.blocks == []  # no block begun
    assert history(trained).finetune.steps == 0
    with time_limit(60), time_limit(None):
        assert not expired()  # an inner "no limit" keeps the outer one, which has not run out


@pytest.mark.slow
def test_recover_command_writes_the_folder_the_report_and_the_chart(tmp_path):
    from util import write_random_images

    runner = CliRunner()
    converted = ["convert", "cifar10-resnet-v1.5", "--weights", "DEFAULT", "--to", "v1", "--input-size", "32",
                 "--out", str(tmp_path / "conv")]
    assert runner.invoke(main, converted).exit_code == 0
    write_random_images(tmp_path / "data", 96, 32)
    args = ["recover", str(tmp_path / "conv"), "--data", str(tmp_path / "data"), "--eval-images", "32",
            "--calibrate-images", "48", "--iterations", "10", "--stages", "bn,features", "--budget", "10m"]
    result = runner.invoke(main, args + ["--plot", str(tmp_path / "recovery.png"), "--out", str(tmp_path / "out"),
                                         "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["out"] == str(tmp_path / "out") and report["metric"] == "agreement"  # a flat folder: no labels
    assert [s["stage"] for s in report["stages"]][:2] == ["naive copy", "bn"]
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "recovery.png").stat().st_size > 1000
    assert "recover: bn" in result.stderr and not (tmp_path / "out.recover.pt").exists()
    recipe = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert recipe["recovery"]["stopped"] == report["stopped"]
    # Bad input: one line, exit 2, nothing written.
    for bad, message in ((["--budget", "soon"], "not a duration"), (["--budget", "0s"], "no time at all"),
                         (["--target", "-1"], "target must be a number > 0")):
        result = runner.invoke(main, args + bad + ["--out", str(tmp_path / "bad")])
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("30m", 1800), ("1h30m", 5400), ("2h", 7200),
                                           ("1.5m", 90), (" 45S ", 45)])
def test_budgets_read_as_people_write_them(text, seconds):
    from resnet_surgery.cli.options import duration

    assert duration(None, None, text) == seconds
