import importlib
import json
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner
from util import relative_error, write_random_images

import resnet_surgery
from resnet_surgery.cli import main
from resnet_surgery.workflows.pipeline import run_pipeline, run_summary


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_inspect_json_and_table():
    result = run("inspect", "resnet50", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["variant"] == "v1.5" and report["macs"] == 4_089_184_256
    table = run("inspect", "resnet18", "--input-size", "64")
    assert table.exit_code == 0 and "layer2.0" in table.output and "25%" not in table.output.split("strided")[0]


def test_convert_writes_a_folder_that_reloads(tmp_path):
    out = tmp_path / "r50v1"
    result = run("convert", "resnet50", "--to", "v1", "--out", out)
    assert result.exit_code == 0, result.output
    assert "v1.5 -> v1" in result.output and "MACs: 4.089 G -> 3.858 G" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "recipe.json", "summary.txt"]
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["source"] == {"model": "resnet50", "kind": "torchvision", "weights": "none"}
    assert [r["op"] for r in recipe["rewrites"]] == ["stride_to_1x1"] * 3 and "torch" in recipe["versions"]
    model = resnet_surgery.load(out)
    assert isinstance(model, torchvision.models.ResNet) and model.layer2[0].conv1.stride == (2, 2)
    # A second conversion of the folder chains recipes and still reloads.
    pruned = tmp_path / "pruned"
    result = run("convert", out, "--prune-dead", "--out", pruned)
    assert result.exit_code == 0, result.output
    assert "MACs: 3.858 G -> 3.482 G" in result.output and "max |difference|" in result.output
    assert relative_error(model, resnet_surgery.load(pruned), 41) <= 1e-5


def test_convert_exact_reports_the_difference(tmp_path):
    result = run("convert", "resnext50_32x4d", "--to", "v1.5", "--shortcut", "conv3x3", "--exact",
                 "--input-size", "64", "--out", tmp_path / "x", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["recipe"]["exact"] is True
    assert 0 <= payload["max_abs_diff"] < 1e-4, "an exact rewrite keeps the function (float rounding only)"


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run("convert", "resnet18", "--to", "d", "--out", out)
    assert result.exit_code == 2 and "already exists; pass --force" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    assert run("convert", "resnet18", "--to", "d", "--out", out, "--force").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "recipe.json").exists()


@pytest.fixture
def bad_files(tmp_path):
    torch.save(torchvision.models.resnet18(), tmp_path / "pickled.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"garbage")
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (["convert", "resnet18", "--to", "v1", "--weights", "{d}/missing.pth"], "weights file not found"),
    (["convert", "resnet18", "--to", "v1", "--weights", "{d}/pickled.pth"], "pickled Python objects"),
    (["convert", "resnet18", "--to", "v1", "--weights", "{d}/corrupt.pth"], "not a readable PyTorch checkpoint"),
    (["convert", "resnet18", "--to", "v1", "--weights", "{d}/r34.pth"], "does not fit resnet18"),
    (["convert", "resnet50", "--to", "v1", "--exact"], "no function-preserving rewrite"),
    (["convert", "resnet9", "--to", "v1"], "unknown model 'resnet9'"),
    (["convert", "resnet18", "--to", "v1", "--weights", "IMAGENET1K_V7"], "has no weights"),
    (["inspect", "mobilenet_v3_small"], "no residual blocks"),
    (["inspect", "vgg11"], "no residual blocks"),
    (["convert", "{d}", "--to", "v1"], "not a folder written by `resnet-surgery convert`"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(bad_files, args, message):
    args = [a.format(d=bad_files) for a in args]
    out = bad_files / "out"
    if args[0] == "convert":
        args += ["--out", str(out)]
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert "Traceback" not in result.output and not out.exists()
    assert not list(bad_files.glob(".out.*"))


@pytest.mark.slow
def test_run_pipeline_with_calibration_on_a_flat_folder_of_images(tmp_path):
    """The whole job on the committed CIFAR-10 model and a few generated images: no ../shared needed."""
    images = write_random_images(tmp_path / "images", 8, 32)
    out = tmp_path / "run"
    result = run_pipeline("cifar10-resnet-v1.5", to="v1", weights="DEFAULT", out=out, input_size=32,
                          calibrate_data=images, num_images=8, iterations=10, min_time_s=0.05, progress=False, echo=lambda *a: None)
    assert sorted(p.name for p in out.iterdir()) == ["converted", "converted.onnx", "latency.json", "latency.png",
                                                      "original.onnx", "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["variants"] == ["v1.5", "v1"] and report["exact"] is False
    assert [s["step"] for s in report["calibration"]["steps"]] == ["naive copy", "bn", "reconstruct"]
    assert report["calibration"]["num_images"] == 8 and all(p["passed"] for p in report["parity"].values())
    assert report["macs"]["converted"] < report["macs"]["original"]
    assert result.latency["batch_sizes"] == [1]
    # every path the reports record is the final one, not the temporary folder renamed away
    latency = json.loads((out / "latency.json").read_text())
    paths = [p["path"] for p in report["parity"].values()] + list(latency["models"].values())
    assert len(paths) == 4 and all(Path(p).is_file() and Path(p).parent == out for p in paths), paths
    assert resnet_surgery.history(resnet_surgery.load(out / "converted")).recipe.calibration["num_images"] == 8
    # summary.txt reads like convert's (a text, not JSON), and is what `run` prints
    summary = (out / "converted" / "summary.txt").read_text()
    assert summary.startswith("cifar10-resnet-v1.5 (weights DEFAULT): v1.5 -> v1, MACs") and "{" not in summary
    assert "ONNX parity" in summary and "passed" in summary and "calibration: 2 steps on 8 images" in summary
    assert summary.strip() == run_summary(result) == str(result)
    assert json.loads(json.dumps(result.to_dict(), default=str)) == report and report["out"] == str(out)


@pytest.mark.slow
def test_run_recovers_with_recover_when_given_images_for_it(tmp_path, monkeypatch):
    recover_module = importlib.import_module("resnet_surgery.recovery.recover")

    monkeypatch.setattr(recover_module, "FEATURE_STEPS", 10)
    images = write_random_images(tmp_path / "images", 16, 32)
    with pytest.raises(resnet_surgery.SurgeryError, match="not both"):
        run_pipeline("cifar10-resnet-v1.5", to="v1", out=tmp_path / "no", recover_data=images, calibrate_data=images)
    with pytest.raises(resnet_surgery.SurgeryError, match="target must be a number > 0"):
        run_pipeline("cifar10-resnet-v1.5", to="v1", out=tmp_path / "no", recover_data=images, target=-1)
    assert not (tmp_path / "no").exists()
    result = run_pipeline("cifar10-resnet-v1.5", to="v1", weights="DEFAULT", out=tmp_path / "run", input_size=32,
                          recover_data=images, num_images=8, iterations=10, budget=300, min_time_s=0.05,
                          progress=False, echo=lambda *a: None)
    stages = [s["stage"] for s in result.recovery["stages"]]
    assert stages[:3] == ["naive copy", "bn", "calibrate"] and result.recovery["metric"] == "agreement"
    assert not (tmp_path / "run" / "recover.pt").exists()
    recipe = json.loads((tmp_path / "run" / "converted" / "recipe.json").read_text())
    assert recipe["recovery"]["stopped"] == result.recovery["stopped"]
    assert "recover: " in (tmp_path / "run" / "converted" / "summary.txt").read_text()


# --- what a new user meets first -----------------------------------------------------------------------


def test_messages_name_the_shell_options_not_the_python_arguments(tmp_path):
    from resnet_surgery.cli.options import for_the_shell

    assert for_the_shell("pass --force (force=True) to overwrite it") == "pass --force to overwrite it"
    assert for_the_shell("use `resnet-surgery recover` (Python: resnet_surgery.recover())") == \
        "use `resnet-surgery recover`"
    (tmp_path / "out").mkdir()
    runner = CliRunner()
    result = runner.invoke(main, ["convert", "resnet18", "--to", "v1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "pass --force to overwrite" in result.output and "=True" not in result.output
    assert for_the_shell("safe loading (weights_only=True) refuses it") == "safe loading (weights_only=True) refuses it"
    result = runner.invoke(main, ["convert", "resnet50", "--to", "v1", "--input-size", "64", "--out", str(tmp_path / "v1")])
    assert result.exit_code == 0, result.output
    assert "recover accuracy with `resnet-surgery recover`" in result.output and "resnet_surgery." not in result.output


@pytest.mark.slow
def test_run_says_when_the_weights_are_random(tmp_path):
    lines = []
    run_pipeline("cifar10-resnet-v1.5", to="v1", weights="none", out=tmp_path / "run", input_size=32,
                 min_time_s=0.05, progress=False, echo=lines.append)
    assert any("has random weights (--weights none)" in line and "no accuracy" in line for line in lines), lines
    lines.clear()
    run_pipeline("cifar10-resnet-v1.5", to="v1", weights="DEFAULT", out=tmp_path / "run2", input_size=32,
                 min_time_s=0.05, progress=False, echo=lines.append)
    assert not any("random weights" in line for line in lines), lines


def test_no_progress_bars_when_the_output_is_not_a_terminal(tmp_path):
    write_random_images(tmp_path / "images", 8, 32)
    result = CliRunner().invoke(main, ["evaluate", "cifar10-resnet-v1.5", "--weights", "DEFAULT", "--data",
                                       str(tmp_path / "images"), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    # A bar would write carriage returns (and "it/s") into the log; the result is one line.
    assert "\r" not in result.output and "it/s" not in result.output and "\x1b[" not in result.output
    assert result.output.count("\n") == 1, result.output
