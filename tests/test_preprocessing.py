"""One preprocessing rule, the same from Python and the command line: the transform given, else the preset's,
else the one the model's weights were published with, else imagenet's."""

import torch
from click.testing import CliRunner
from util import write_random_images

import resnet_surgery as rs
from resnet_surgery.cli import main


def test_the_same_calibration_from_python_and_the_cli_gives_the_same_model(tmp_path):
    data = tmp_path / "images"
    write_random_images(data / "cat", 6, 32)
    write_random_images(data / "dog", 6, 32, seed=1)
    run = CliRunner().invoke
    assert run(main, ["convert", "cifar10-resnet-v1.5", "--weights", "DEFAULT", "--to", "v1", "--input-size", "32",
                      "--out", str(tmp_path / "conv")]).exit_code == 0
    result = run(main, ["calibrate", str(tmp_path / "conv"), "--data", str(data), "--iterations", "3",
                        "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    original = rs.load_model("cifar10-resnet-v1.5", "DEFAULT")
    python = rs.calibrate(rs.load(tmp_path / "conv"), original, str(data), iterations=3, progress=False)
    cli = rs.load(tmp_path / "cli").state_dict()
    assert all(torch.equal(v, cli[k]) for k, v in python.state_dict().items())
    # The CIFAR-10 model's own rule is its 32x32 preset, not imagenet's 224 crop.
    from PIL import Image

    assert rs.preprocessing(original)(Image.new("RGB", (40, 40))).shape == (3, 32, 32)
    assert rs.preprocessing(None)(Image.new("RGB", (40, 40))).shape == (3, 224, 224)


def test_the_rule_in_order():
    model = rs.load_model("cifar10-resnet-v1.5", "DEFAULT")
    mine = lambda x: x  # noqa: E731
    assert rs.preprocessing(model, "cifar10", transform=mine) is mine
    assert repr(rs.preprocessing(model, "imagenet")) == repr(rs.preprocessing(None))  # the preset, then the default
    assert repr(rs.preprocessing(model)) == repr(rs.model_transform(model)) != repr(rs.preprocessing(None))


def test_rs_save_writes_the_summary_the_command_line_writes(tmp_path):
    original = rs.load_model("cifar10-resnet-v1.5", "DEFAULT")
    converted = rs.convert(original, "v1", input_size=(3, 32, 32), warn=False)
    calibrated = rs.calibrate(converted, original, torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32)),
                              steps=("bn",), progress=False)
    text = (rs.save(calibrated, tmp_path / "py") / "summary.txt").read_text()
    assert "source: cifar10-resnet-v1.5" in text and "converted v1.5 -> v1 (approximate)" in text
    assert str(rs.history(calibrated).calibration) in text  # what `resnet-surgery calibrate` writes after its header
