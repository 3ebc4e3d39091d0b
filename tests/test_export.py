import importlib
import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet
from util import CaffeResNet, randomize_bn

from resnet_surgery import SurgeryError, SurgeryNotice, convert, count_macs, history
from resnet_surgery.cli import main
from resnet_surgery.deploy.export import ParityError, export_onnx, onnx_input_shape, onnx_metadata

export_module = importlib.import_module("resnet_surgery.deploy.export")


def tiny_net(channels: int = 8) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, 2, 1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, 10),
    )


class Branch(nn.Module):
    """Stem conv, then one downsampling operator whose ONNX export has a history, then a classifier."""

    def __init__(self, op: nn.Module):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.op = op
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = self.op(torch.relu(self.stem(x)))
        # Keep every spatial position in the output, so an off-by-one border shows in the logits.
        return torch.cat([y.flatten(1), self.head(y.mean((2, 3)))], 1)


DOWNSAMPLERS = {
    "avgpool_shortcut": lambda: nn.Sequential(
        nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False), nn.Conv2d(8, 8, 1)
    ),
    "conv3x3_s2_dilated": lambda: nn.Conv2d(8, 8, 3, stride=2, dilation=2, padding=2),
    "conv1x1_s2": lambda: nn.Conv2d(8, 8, 1, stride=2),
    "conv3x3_s2_shortcut": lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1),
}


class ExportsDifferently(nn.Module):
    """Adds ``delta`` only while being exported: a real difference between the file and the model."""

    def __init__(self, delta: float = 1e-3):
        super().__init__()
        self.net = tiny_net()
        self.delta = delta

    def forward(self, x):
        y = self.net(x)
        return y + self.delta if torch.compiler.is_exporting() else y


def only_file(folder, name="model.onnx"):
    return sorted(p.name for p in folder.iterdir()) == [name]


def test_export_is_one_file_with_dynamic_batch_and_passes_parity(tmp_path):
    out = tmp_path / "model.onnx"
    report = export_onnx(tiny_net(), out, input_size=(3, 32, 32))
    assert only_file(tmp_path), "weights must be inside the .onnx file: no .data file, no temporary left"
    assert report.passed and report.exporter == "dynamo" and report.fallback_reason is None
    assert [c.batch for c in report.checks] == [1, 4]
    assert all(c.top1_agree == c.batch for c in report.checks)
    assert report.max_abs_diff < 1e-5
    assert onnx_input_shape(out) == ["batch", 3, 32, 32]
    onnx.checker.check_model(str(out), full_check=True)
    assert not onnx.load(str(out)).graph.initializer[0].external_data
    # The batch axis really is dynamic: an unseen batch size runs.
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": np.zeros((7, 3, 32, 32), np.float32)})[0].shape == (7, 10)
    # MACs travel in the file's metadata for `bench`.
    assert int(onnx_metadata(out)[export_module.MACS_METADATA_KEY]) == report.macs == 8 * 27 * 16 * 16 + 80
    d = report.to_dict()
    json.dumps(d)
    assert d["passed"] is True and len(d["checks"]) == 2
    text = str(report)
    assert "parity: PASS" in text and "dynamic batch" in text


def test_static_batch_checks_batch_one_only(tmp_path):
    out = tmp_path / "model.onnx"
    net = tiny_net().train()
    report = export_onnx(net, out, input_size=(3, 20, 20), dynamic_batch=False, opset=18)
    assert net.training, "export must leave the model's training flag as it found it"
    assert onnx_input_shape(out) == [1, 3, 20, 20]
    assert [c.batch for c in report.checks] == [1]
    assert report.opset == 18 and not report.dynamic_batch


def test_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "model.onnx"
    out.write_text("keep me")
    with pytest.raises(SurgeryError, match="--force"):
        export_onnx(tiny_net(), out, input_size=(3, 16, 16))
    assert out.read_text() == "keep me"
    export_onnx(tiny_net(), out, input_size=(3, 16, 16), force=True)
    assert onnx_input_shape(out) == ["batch", 3, 16, 16]


@pytest.mark.parametrize("size", [33, 57])
@pytest.mark.parametrize("op", list(DOWNSAMPLERS))
def test_downsampling_operators_at_odd_sizes(tmp_path, op, size):
    """AvgPool2d(ceil_mode=True, count_include_pad=False) once exported wrong (pytorch #99424, onnx #4958)."""
    model = Branch(DOWNSAMPLERS[op]()).eval()
    report = export_onnx(model, tmp_path / "m.onnx", input_size=(3, size, size), atol=1e-5, rtol=1e-5)
    assert report.passed, str(report)
    half = -(-size // 2)
    assert report.checks[0].max_abs_logit > 0
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].shape[1] == 8 * half * half + 5


def test_parity_failure_raises_with_report_and_leaves_nothing(tmp_path):
    out = tmp_path / "model.onnx"
    with pytest.raises(ParityError, match="parity failed.*nothing written") as caught:
        export_onnx(ExportsDifferently(), out, input_size=(3, 16, 16), rtol=0)
    report = caught.value.report
    assert not report.passed and abs(report.max_abs_diff - 1e-3) < 1e-5
    assert "FAIL" in str(report)
    assert list(tmp_path.iterdir()) == []
    # The same difference is accepted when the tolerance allows it.
    assert export_onnx(ExportsDifferently(), out, input_size=(3, 16, 16), atol=2e-3).passed


def test_parity_failure_keeps_an_existing_file(tmp_path):
    out = tmp_path / "model.onnx"
    export_onnx(tiny_net(), out, input_size=(3, 16, 16))
    before = out.read_bytes()
    with pytest.raises(ParityError):
        export_onnx(ExportsDifferently(1.0), out, input_size=(3, 16, 16), force=True)
    assert out.read_bytes() == before and only_file(tmp_path)


def test_nan_output_fails_parity(tmp_path):
    with pytest.raises(ParityError):
        export_onnx(ExportsDifferently(float("nan")), tmp_path / "model.onnx", input_size=(3, 16, 16))
    assert list(tmp_path.iterdir()) == []


def test_falls_back_to_torchscript_and_says_so(tmp_path, monkeypatch):
    real_export = torch.onnx.export

    def dynamo_broken(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("simulated dynamo failure")
        return real_export(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_broken)
    with pytest.warns(UserWarning, match="falling back to the TorchScript exporter"):
        report = export_onnx(tiny_net(), tmp_path / "model.onnx", input_size=(3, 16, 16))
    assert report.exporter == "torchscript" and "simulated dynamo failure" in report.fallback_reason
    assert report.passed and [c.batch for c in report.checks] == [1, 4]
    assert "TorchScript" in str(report) and only_file(tmp_path)


def test_both_exporters_failing_is_a_clear_error(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(export_module.ExportError, match="dynamo exporter.*TorchScript exporter"):
            export_onnx(tiny_net(), tmp_path / "model.onnx", input_size=(3, 16, 16))
    assert list(tmp_path.iterdir()) == []


def test_weights_over_the_protobuf_limit_go_to_a_data_file(tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "_MAX_INLINE_BYTES", 0)
    out = tmp_path / "model.onnx"
    report = export_onnx(tiny_net(), out, input_size=(3, 16, 16))
    assert report.passed and report.external_data == ["model.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert ort.InferenceSession(str(out)).run(None, {"input": np.zeros((2, 3, 16, 16), np.float32)})[
        0
    ].shape == (2, 10)


def test_input_shape_of_bad_files(tmp_path):
    with pytest.raises(SurgeryError, match="no such ONNX file"):
        onnx_input_shape(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not a model\n")
    with pytest.raises(SurgeryError, match="not an ONNX model"):
        onnx_input_shape(bad)
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(SurgeryError, match="not an ONNX model"):
        onnx_input_shape(tmp_path / "empty.onnx")


def small_bottleneck_resnet() -> nn.Module:
    """torchvision's ResNet class and layout (layer1..4, downsample.0/1), one narrow block per stage."""
    return randomize_bn(ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=16))


def engine_variants() -> dict:
    base = small_bottleneck_resnet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeryNotice)
        v1 = convert(base, "v1")
        return {
            "v1.5": base,
            "v1": v1,
            "v1.5-exact-dilated": convert(v1, "v1.5", exact=True),
            "d": convert(base, "d"),
            "shortcut-conv3x3": convert(base, shortcut="conv3x3"),
            "v1-pruned": convert(v1, prune_dead=True),
            "custom-v1.5": randomize_bn(CaffeResNet(v1=False, units=(1, 1, 1))),
            "custom-d": convert(randomize_bn(CaffeResNet(v1=False, units=(1, 1, 1))), "d"),
        }


@pytest.fixture(scope="module")
def variants():
    return engine_variants()


@pytest.mark.slow
@pytest.mark.parametrize("size", [64, 57])
@pytest.mark.parametrize(
    "variant",
    ["v1.5", "v1", "v1.5-exact-dilated", "d", "shortcut-conv3x3", "v1-pruned", "custom-v1.5", "custom-d"],
)
def test_every_engine_variant_exports_with_parity(tmp_path, variants, variant, size):
    report = export_onnx(variants[variant], tmp_path / "m.onnx", input_size=(3, size, size))
    assert report.passed and report.exporter == "dynamo", str(report)
    assert all(c.top1_agree == c.batch for c in report.checks)


def test_engine_variants_are_what_they_claim(variants):
    ops = {
        name: {r.op for r in history(m).recipe.rewrites}
        for name, m in variants.items()
        if history(m).recipe is not None
    }
    assert ops["v1"] == {"stride_to_1x1"}
    assert ops["v1.5-exact-dilated"] == {"stride_to_3x3_dilated"}
    assert ops["d"] == {"shortcut_avgpool"}
    assert ops["shortcut-conv3x3"] == {"shortcut_conv3x3"}
    assert "prune_dead" in ops["v1-pruned"]
    assert ops["custom-d"] == {"shortcut_avgpool"}


@pytest.mark.slow
def test_torchvision_resnet18(tmp_path):
    model = torchvision.models.resnet18().eval()
    report = export_onnx(model, tmp_path / "r18.onnx", input_size=(3, 64, 64))
    assert report.passed and report.exporter == "dynamo" and only_file(tmp_path, "r18.onnx")
    assert report.macs == count_macs(model, (3, 64, 64))


# --- CLI -----------------------------------------------------------------------------------------


CIFAR = ["cifar10-resnet-v1.5", "--weights", "DEFAULT"]


def test_cli_export_writes_and_reports(tmp_path):
    out = tmp_path / "tiny.onnx"
    result = CliRunner().invoke(main, ["export", *CIFAR, "--out", str(out), "--input-size", "16"])
    assert result.exit_code == 0, result.output
    assert "parity: PASS" in result.output and only_file(tmp_path, "tiny.onnx")
    # Without --force an existing output is refused; with it, JSON on request.
    result = CliRunner().invoke(main, ["export", *CIFAR, "--out", str(out), "--input-size", "16"])
    assert result.exit_code == 2 and "already exists" in result.output
    result = CliRunner().invoke(
        main,
        ["export", *CIFAR, "--out", str(out), "--input-size", "16", "--static-batch", "--force", "--json"],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["input_shape"] == [1, 3, 16, 16]


def test_cli_export_errors_are_one_line(tmp_path):
    out = tmp_path / "x.onnx"
    result = CliRunner().invoke(main, ["export", "nonexistent", "--out", str(out)])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert result.output.startswith("error: unknown model 'nonexistent'")
    result = CliRunner().invoke(
        main, ["export", "resnet18", "--weights", str(tmp_path / "no.pth"), "--out", str(out)]
    )
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        f"error: weights file not found: {tmp_path / 'no.pth'}"
    ]
    # No tolerance at all: the float32 rounding differences of a real network fail parity.
    result = CliRunner().invoke(main, ["export", *CIFAR, "--out", str(out), "--input-size", "16", "--atol", "0",
                                       "--rtol", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1].startswith("error: ONNX parity failed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_export_of_a_convert_folder(tmp_path):
    folder = tmp_path / "conv"
    result = CliRunner().invoke(
        main, ["convert", "resnet18", "--to", "d", "--out", str(folder), "--input-size", "64"]
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "d.onnx"
    result = CliRunner().invoke(
        main, ["export", str(folder), "--out", str(out), "--input-size", "64", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["passed"] is True
