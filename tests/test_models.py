import pytest
import torch
import torchvision
from safetensors.torch import save_file

from resnet_surgery import Source, SurgeryError, history, load_model


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def test_enum_weights_load_offline_from_the_torch_home_cache(torch_home):
    # The real download path: torchvision's enum finds its file in $TORCH_HOME/hub/checkpoints.
    reference = torchvision.models.resnet18()
    name = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(reference.state_dict(), torch_home / "hub" / "checkpoints" / name)
    with pytest.warns(UserWarning, match="does not match the sha256 prefix"):
        model = load_model("resnet18", "IMAGENET1K_V1")
    assert torch.equal(model.fc.weight, reference.fc.weight)
    with pytest.warns(UserWarning):
        assert torch.equal(load_model("resnet18", "DEFAULT").conv1.weight, reference.conv1.weight)
    assert history(model).source == Source("resnet18", "torchvision", "IMAGENET1K_V1")


def test_uncached_enum_weights_fail_with_a_fix(torch_home, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(SurgeryError, match=r"cannot download .*put the file at .*resnet18-f37072fd.pth"):
        load_model("resnet18", "IMAGENET1K_V1")
    with pytest.raises(SurgeryError, match="has no weights 'IMAGENET1K_V9'"):
        load_model("resnet18", "IMAGENET1K_V9")


def test_local_checkpoints(tmp_path):
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, tmp_path / "ddp.pt")
    save_file(reference.state_dict(), str(tmp_path / "w.safetensors"))
    for f in ("w.pth", "ddp.pt", "w.safetensors"):
        assert torch.equal(load_model("resnet18", str(tmp_path / f)).fc.weight, reference.fc.weight)


def test_bad_checkpoints_get_one_line_errors(tmp_path):
    torch.save(torchvision.models.resnet18(), tmp_path / "pickled.pth")  # a whole pickled model
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 10)
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    small = torchvision.models.resnet18(num_classes=10).state_dict()
    torch.save(small, tmp_path / "r18_10.pth")
    cases = {
        "missing.pth": "weights file not found",
        "pickled.pth": "pickled Python objects",
        "corrupt.pth": "not a readable PyTorch checkpoint",
        "corrupt.safetensors": "not a readable safetensors file",
        "r34.pth": r"does not fit resnet18: .*unexpected \(layer1.2",
        "r18_10.pth": r"shape mismatches \(fc.weight: checkpoint \[10, 512\] vs model \[1000, 512\]",
    }
    for f, message in cases.items():
        with pytest.raises(SurgeryError, match=message) as e:
            load_model("resnet18", str(tmp_path / f))
        assert "\n" not in str(e.value)


def test_model_names():
    with pytest.raises(SurgeryError, match="unknown model 'resnet9'"):
        load_model("resnet9")
    assert type(load_model("timm:resnet26")).__name__ == "ResNet"
    with pytest.raises(SurgeryError, match="timm cannot create"):
        load_model("timm:not_a_model")
