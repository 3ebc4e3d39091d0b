"""The trained ResNet-50 that recovery is judged by (cifar10-resnet50): its layout, and loading it offline by
name or path from a small file placed in a temporary folder."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from resnet_surgery.data import cifar10_tensors, model_transform, normalize_uint8
from resnet_surgery.errors import SurgeryError
from resnet_surgery.history import history
from resnet_surgery.zoo.judge import JUDGE_NAME, build_judge, judge_info, load_judge
from resnet_surgery.zoo.registry import load_named

SMALL = {"widths": "[4, 4, 8, 8]", "blocks": "[1, 1, 2, 1]"}


def write_judge(path: Path, *, input_size: int = 48, poison: bool = False) -> torch.nn.Module:
    """A small stand-in saved as train_resnet50.py saves it (fp16, the architecture in the metadata)."""
    torch.manual_seed(0)
    model = build_judge("standin", SMALL).eval()
    for m in model.modules():  # trained-like statistics, so a bad load would show in the outputs
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    if poison:
        state["fc.weight"][0, 0] = float("nan")
    save_file(state, str(path), metadata={"arch": "standin", "input_size": str(input_size), **SMALL})
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model


def test_the_stand_in_has_resnet50s_layout_and_names():
    standin, resnet50 = build_judge(), torchvision.models.resnet50(num_classes=10)
    assert list(standin.state_dict()) == list(resnet50.state_dict())  # every module name, in torchvision's order
    assert [len(getattr(standin, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert standin.layer4[0].conv2.stride == (2, 2) and standin.layer4[0].conv1.stride == (1, 1)  # v1.5
    # a quarter of the width: the last stage's output is 512 channels, not 2048
    assert standin.fc.in_features == 512 and standin(torch.zeros(1, 3, 64, 64)).shape == (1, 10)


def test_the_judge_loads_by_name_offline_from_the_weights_folder(tmp_path, monkeypatch):
    expected = write_judge(tmp_path / f"{JUDGE_NAME}.safetensors")
    monkeypatch.setenv("RESNET_SURGERY_WEIGHTS", str(tmp_path))
    model = load_named(JUDGE_NAME, "DEFAULT")
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(x), expected(x))
    assert not model.training and model.input_size == 48 and history(model).source.model == JUDGE_NAME
    # its own transform makes images of the size it was trained at
    assert model_transform(model)(torchvision.transforms.functional.to_pil_image(torch.rand(3, 32, 32))).shape == (3, 48, 48)


def test_the_judge_loads_from_a_path_and_refuses_bad_files(tmp_path, monkeypatch):
    path = tmp_path / "mine.safetensors"
    write_judge(path, input_size=64)
    assert load_named(JUDGE_NAME, str(path)).input_size == 64 and judge_info(path)["arch"] == "standin"
    monkeypatch.setenv("RESNET_SURGERY_WEIGHTS", str(tmp_path / "empty"))
    with pytest.raises(SurgeryError, match="train_resnet50.py"):
        load_named(JUDGE_NAME, "DEFAULT")
    write_judge(tmp_path / "nan.safetensors", poison=True)
    with pytest.raises(SurgeryError, match="non-finite"):
        load_judge(tmp_path / "nan.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(SurgeryError, match="not a readable safetensors"):
        load_judge(tmp_path / "junk.safetensors")
    with pytest.raises(SurgeryError, match="must be DEFAULT, none or a .safetensors"):
        load_named(JUDGE_NAME, "IMAGENET1K_V2")


@pytest.mark.slow
def test_the_training_script_writes_a_loadable_fp16_file_and_its_record(tmp_path, shared_data):
    out, results = tmp_path / "judge.safetensors", tmp_path / "train.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_resnet50.py"
    subprocess.run([sys.executable, str(script), "--epochs", "1", "--train-images", "512", "--batch-size", "128",
                    "--size", "40", "--data", str(shared_data), "--out", str(out), "--results", str(results)],
                   check=True, capture_output=True, timeout=600)
    record = json.loads(results.read_text())
    assert record["epochs_done"] == 1 and record["sha256"] and record["cpu_flags"] is not None
    assert record["settings"]["size"] == 40 and 0 <= record["test_top1"] <= 100
    model = load_judge(out)
    assert model.input_size == 40 and all(v.dtype == torch.float32 for v in model.state_dict().values()
                                          if v.is_floating_point())


def test_the_committed_judge_is_the_recorded_file_and_scores_as_recorded(shared_data, monkeypatch):
    monkeypatch.delenv("RESNET_SURGERY_WEIGHTS", raising=False)
    repo = Path(__file__).resolve().parents[1]
    record = json.loads((repo / "benchmarks" / "results" / "train_resnet50.json").read_text())
    path = repo / record["weights"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"] and path.stat().st_size <= 50 << 20
    model = load_named(JUDGE_NAME, "DEFAULT")  # offline, by name
    assert model.input_size == record["settings"]["size"] == int(judge_info()["input_size"])
    images, labels = cifar10_tensors(shared_data, "test")
    x = torch.nn.functional.interpolate(normalize_uint8(images[::20]), size=(model.input_size,) * 2,
                                        mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        top1 = 100.0 * float((model(x).argmax(1) == labels[::20]).float().mean())
    assert abs(top1 - record["test_top1"]) < 4.0  # 500 of the 10,000 test images
