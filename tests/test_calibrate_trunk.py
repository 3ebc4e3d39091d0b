"""calibrate on detection and segmentation models: the trunk is repaired, outputs are measured by relative error."""

import copy
import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.utils.data import TensorDataset
from torchvision.ops.misc import FrozenBatchNorm2d
from util import write_random_images

from resnet_surgery import SurgeryNotice, calibrate, convert, history, load, load_model, save
from resnet_surgery.cli import main
from resnet_surgery.errors import SurgeryError

SIZE = 96
# Random init: conv weights are small, so the reconstruction needs a lower peak rate than trained weights.
LR = 1e-4


def randomize_norms(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random statistics and affine parameters for every norm, FrozenBatchNorm2d included."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            n = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def v1(name: str):
    original = randomize_norms(load_model(name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeryNotice)
        return original, convert(original, "v1", input_size=(3, SIZE, SIZE))


def images(n: int, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def trunk_error(model: nn.Module, original: nn.Module, x: torch.Tensor) -> float:
    """Mean relative error of every pyramid level of the backbone against the original's."""
    with torch.no_grad():
        a, b = model.backbone.eval()(x), original.backbone(x)
    return sum(float((a[k] - b[k]).norm() / b[k].norm()) for k in b) / len(b)


@pytest.fixture(scope="module")
def retinanet():
    torch.manual_seed(0)
    original, converted = v1("retinanet_resnet50_fpn")
    before = copy.deepcopy(converted.state_dict())
    data = TensorDataset(images(32), torch.zeros(32, dtype=torch.long))
    model = calibrate(converted, original, data, num_images=None, steps=("bn", "reconstruct"), iterations=20, lr=LR,
                      batch_size=16, progress=False)
    return original, converted, before, model


@pytest.mark.slow
def test_detection_trunk_is_calibrated_and_the_whole_model_comes_back(retinanet):
    original, converted, before, model = retinanet
    assert type(model) is type(converted) and history(model).recipe.trunk == "backbone"
    report = history(model).calibration
    errors = [s.output_error for s in report.steps]
    assert [s.step for s in report.steps] == ["naive copy", "bn", "reconstruct"] and report.num_images == 32
    assert errors[2] < errors[1] < errors[0]  # each step lowers the trunk's output error
    assert all(s.agreement.agreement is None for s in report.steps)  # pyramid levels are not logits
    assert [b.block for b in report.blocks] == [f"backbone.body.layer{i}.0" for i in (2, 3, 4)]
    assert "output error" in str(report) and "agreement" not in str(report)
    assert history(model).recipe.calibration["steps"][2]["output_error"] == errors[2]
    # Held-out images agree: the repaired trunk is closer to the original's than the naive copy.
    held_out = images(4, seed=1)
    assert trunk_error(model, original, held_out) < trunk_error(converted, original, held_out)
    # Only the trunk changed, and `converted` did not.
    assert all(torch.equal(v, before[k]) for k, v in converted.state_dict().items())
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"backbone"}


def test_an_original_without_the_trunk_is_one_clear_error():
    _, converted = v1("retinanet_resnet50_fpn")
    with pytest.raises(SurgeryError, match="has no module 'backbone'"):
        calibrate(converted, load_model("resnet18"), TensorDataset(images(2)), progress=False)


@pytest.mark.slow
def test_calibrated_detection_model_detects_and_round_trips(retinanet, tmp_path):
    _, _, _, model = retinanet
    save(model, tmp_path / "cal")
    loaded = load(tmp_path / "cal")
    assert history(loaded).recipe.calibration["num_images"] == 32
    x = images(2, seed=2)
    for m in (model, loaded):  # the detection transform resizes to SIZE: a small, fast forward
        m.transform.min_size, m.transform.max_size = (SIZE,), SIZE
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.backbone(x).values(), loaded.eval().backbone(x).values()))
        detections = model.eval()([x[0].sigmoid()])
        again = loaded([x[0].sigmoid()])
    assert set(detections[0]) == {"boxes", "scores", "labels"} and detections[0]["boxes"].shape[1] == 4
    assert all(torch.equal(detections[0][k], again[0][k]) for k in detections[0])


@pytest.mark.slow
def test_segmentation_model_is_calibrated_on_its_outputs():
    original, converted = v1("fcn_resnet50")
    data = TensorDataset(images(16, size=64))
    model = calibrate(converted, original, data, num_images=None, iterations=20, lr=LR, batch_size=16, progress=False)
    report = history(model).calibration
    errors = [s.output_error for s in report.steps]
    assert errors[-1] < errors[0] and [b.block for b in report.blocks] == ["backbone.layer2.0"]
    with torch.no_grad():
        out = model.eval()(images(1, size=64))
    assert out["out"].shape == (1, 21, 64, 64)


@pytest.mark.slow
def test_cli_calibrates_a_converted_detection_folder(tmp_path):
    folder = write_random_images(tmp_path / "images", 8, SIZE)
    runner = CliRunner()
    result = runner.invoke(main, ["convert", "fasterrcnn_resnet50_fpn", "--to", "v1", "--input-size", str(SIZE),
                                  "--out", str(tmp_path / "v1")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["calibrate", str(tmp_path / "v1"), "--original", "fasterrcnn_resnet50_fpn",
                                  "--data", str(folder), "--size", str(SIZE), "--num-images", "8", "--iterations", "3",
                                  "--lr", str(LR), "--out", str(tmp_path / "cal"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [s["step"] for s in report["steps"]] == ["naive copy", "bn", "reconstruct"] and report["num_images"] == 8
    assert all(s["output_error"] > 0 for s in report["steps"])
    calibrated = load(tmp_path / "cal")
    assert history(calibrated).recipe.trunk == "backbone"
    assert "output error" in (tmp_path / "cal" / "summary.txt").read_text()
