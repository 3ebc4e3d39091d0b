import json

import onnx
import onnx.numpy_helper
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch.utils.data import TensorDataset

import resnet_surgery.deploy.cpu
from resnet_surgery import SurgeryError, compare_latency, export_onnx
from resnet_surgery.cli import main
from resnet_surgery.data import CIFAR10_CLASSES, cifar10_tensors, disjoint_subsets, normalize_uint8
from resnet_surgery.deploy.cpu import cpu_extensions, has_vnni, weight_range_warning
from resnet_surgery.deploy.export import MACS_METADATA_KEY, onnx_metadata
from resnet_surgery.deploy.onnxfile import is_quantized
from resnet_surgery.deploy.quantize import QUANT_METADATA_KEY, QuantizationError, quantize_onnx
from resnet_surgery.zoo.cifar import load_cifar_resnet


@pytest.fixture(scope="module")
def cifar_images(shared_data):
    """600 CIFAR-10 test images, normalised, with labels."""
    images, labels = cifar10_tensors(shared_data, "test")
    keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:600]
    return TensorDataset(normalize_uint8(images[keep]), labels[keep])


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp32") / "cifar.onnx"
    export_onnx(load_cifar_resnet("v1.5"), path, input_size=(3, 32, 32))
    return path


def test_disjoint_subsets_share_no_image():
    data = TensorDataset(torch.arange(10))
    a, b, rest = disjoint_subsets(data, [3, 4, None], seed=1)
    assert (len(a), len(b), len(rest)) == (3, 4, 3)
    assert sorted(a.indices + b.indices + rest.indices) == list(range(10))
    assert disjoint_subsets(data, [3], seed=1)[0].indices == a.indices  # seeded
    small, cut = disjoint_subsets(data, [8, 5])
    assert len(cut) == 2  # cut down to what is left
    with pytest.raises(SurgeryError, match="too few for disjoint subsets"):
        disjoint_subsets(data, [10, 1])


def test_int8_keeps_agreement_with_fp32_on_held_out_images(fp32_onnx, cifar_images, tmp_path):
    out = tmp_path / "cifar.int8.onnx"
    report = quantize_onnx(fp32_onnx, out, cifar_images, num_images=128, parity_images=256, min_agreement=95,
                           progress=False)
    assert out.is_file() and report.passed and report.path == str(out)
    # 128 calibration images and 256 others for parity: all 384 distinct images of the 600.
    assert (report.calibration_images, report.parity_images) == (128, 256)
    assert report.agreement >= 95 and 0 <= report.kl < 0.05
    assert abs(report.top1_int8 - report.top1_fp32) <= 3 and report.int8_bytes < report.fp32_bytes / 2
    proto = onnx.load(str(out))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    # Activations uint8 (U8S8, what x86 VNNI kernels take), weights int8.
    zero_points = {t.name: t.data_type for t in proto.graph.initializer}
    activation_types = {zero_points[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    weight_types = {zero_points[n.input[2]] for n in proto.graph.node
                    if n.op_type == "DequantizeLinear" and n.input[0] in zero_points}
    assert report.activations == "uint8" and activation_types == {onnx.TensorProto.UINT8}
    assert is_quantized(proto) and not is_quantized(onnx.load(str(fp32_onnx)))  # latency's '% peak' skips int8
    assert weight_types == {onnx.TensorProto.INT8, onnx.TensorProto.INT32}  # conv weights; biases are int32
    meta = onnx_metadata(out)
    assert meta[MACS_METADATA_KEY] == onnx_metadata(fp32_onnx)[MACS_METADATA_KEY]
    assert json.loads(meta[QUANT_METADATA_KEY])["agreement"] == report.agreement
    assert "int8 parity: PASS" in str(report)
    # 7-bit weights by default (reduce_range): no u8 x s8 saturation on CPUs without VNNI.
    assert report.reduce_range and int8_weight_range(proto) <= 64 and "7-bit weights (reduce_range)" in str(report)
    stamped = json.loads(meta[QUANT_METADATA_KEY])
    assert stamped["reduce_range"] is True and stamped["cpu_extensions"] == cpu_extensions()
    with pytest.raises(SurgeryError, match="already exists"):
        quantize_onnx(fp32_onnx, out, cifar_images, num_images=8, parity_images=8, progress=False)


def int8_weight_range(proto) -> int:
    """The largest |value| among the file's int8 initializers (the quantized weights)."""
    return max(int(abs(onnx.numpy_helper.to_array(t).astype(int)).max()) for t in proto.graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and t.dims)


def test_full_range_weights_are_a_choice_and_recorded(fp32_onnx, cifar_images, tmp_path, monkeypatch):
    out = tmp_path / "full.int8.onnx"
    report = quantize_onnx(fp32_onnx, out, cifar_images, num_images=64, parity_images=64, min_agreement=90,
                           reduce_range=False, progress=False)
    assert not report.reduce_range and int8_weight_range(onnx.load(str(out))) > 64
    assert json.loads(onnx_metadata(out)[QUANT_METADATA_KEY])["reduce_range"] is False
    assert "full 8-bit weights" in str(report)
    # Where it runs matters: timed on a CPU without VNNI, the file is flagged; with 7-bit weights it is not.
    seven = quantize_onnx(fp32_onnx, tmp_path / "seven.int8.onnx", cifar_images, num_images=64, parity_images=64,
                          min_agreement=90, progress=False)
    monkeypatch.setattr(resnet_surgery.deploy.cpu, "cpu_extensions", lambda cpuinfo=None: ["avx2"])
    report = compare_latency({"full": out, "seven": seven.path}, batch_sizes=(1,), min_time_s=0.01, max_time_s=0.02,
                             progress=False)
    flagged = [w for w in report.warnings if "no VNNI" in w]
    assert len(flagged) == 1 and str(out) in flagged[0] and "full 8-bit weights" in flagged[0]


def test_weight_range_warning_needs_both_a_full_range_file_and_a_cpu_without_vnni():
    full, seven = {"reduce_range": False}, {"reduce_range": True}
    assert weight_range_warning(full, "m.onnx", ["avx2"]) is not None
    assert weight_range_warning(None, "m.onnx", ["avx2"]) is not None  # another tool's file: unknown range
    assert weight_range_warning(seven, "m.onnx", ["avx2"]) is None
    assert weight_range_warning(full, "m.onnx", ["avx2", "avx512f", "avx512_vnni"]) is None


def test_cpu_extensions_come_from_the_flags_line():
    text = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni amx_tile amx_int8 avx512_bf16\n"
    assert cpu_extensions(text) == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"]
    assert has_vnni(cpu_extensions(text)) and not has_vnni(cpu_extensions("flags\t: fpu avx2 fma\n"))
    assert cpu_extensions("no flags here") == []


def test_constant_calibration_fails_the_threshold_and_writes_nothing(fp32_onnx, cifar_images, tmp_path):
    constant = TensorDataset(torch.zeros(64, 3, 32, 32))  # every activation range collapses to a point
    out = tmp_path / "broken.int8.onnx"
    with pytest.raises(QuantizationError, match=r"below the minimum 98%; nothing written") as e:
        quantize_onnx(fp32_onnx, out, constant, parity_data=cifar_images, num_images=64, parity_images=200,
                      progress=False)
    assert e.value.report.agreement < 90 and not e.value.report.passed
    assert list(tmp_path.iterdir()) == []  # no file, no temporary left behind


def test_quantize_bad_input(fp32_onnx, tmp_path):
    data = TensorDataset(torch.randn(8, 3, 32, 32))
    with pytest.raises(SurgeryError, match="is the fp32 input itself"):
        quantize_onnx(fp32_onnx, fp32_onnx, data, force=True)
    with pytest.raises(SurgeryError, match="unknown calibration method"):
        quantize_onnx(fp32_onnx, tmp_path / "q.onnx", data, method="kl")
    with pytest.raises(SurgeryError, match="takes \\[3, 32, 32\\]"):
        quantize_onnx(fp32_onnx, tmp_path / "q.onnx", TensorDataset(torch.randn(8, 3, 64, 64)))
    with pytest.raises(SurgeryError, match="dataset is empty"):
        quantize_onnx(fp32_onnx, tmp_path / "q.onnx", TensorDataset(torch.randn(0, 3, 32, 32)))
    (tmp_path / "not.onnx").write_text("text")
    with pytest.raises(SurgeryError, match="is not an ONNX model"):
        quantize_onnx(tmp_path / "not.onnx", tmp_path / "q.onnx", data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not.onnx"]


def write_image_folder(root, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / CIFAR10_CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_cli_export_int8(shared_data, tmp_path):
    images, labels = cifar10_tensors(shared_data, "test")
    folder = write_image_folder(tmp_path / "calib", images[:200], labels[:200].tolist())

    def export(out, preset="cifar10", *extra):
        args = ["export", "cifar10-resnet-v1.5", "--weights", "DEFAULT", "--input-size", "32", "--int8",
                "--calibration-data", folder, "--preset", preset, "--calibration-images", "64",
                "--parity-images", "96", "--min-agreement", "90", "--out", out, *extra]
        return CliRunner().invoke(main, [str(a) for a in args])

    out = tmp_path / "m.int8.onnx"
    result = export(out, "cifar10", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output[result.output.index("{"):])
    assert payload["fp32"]["passed"] and payload["int8"]["passed"] and payload["int8"]["parity_images"] == 96
    assert out.is_file() and not list(tmp_path.glob(".*"))  # the fp32 file was temporary
    assert payload["int8"]["reduce_range"] is True
    full = export(tmp_path / "full.int8.onnx", "cifar10", "--json", "--full-range-weights")
    assert full.exit_code == 0 and json.loads(full.output[full.output.index("{"):])["int8"]["reduce_range"] is False

    # Bad input: one line on stderr, exit 2, nothing written.
    no_data = CliRunner().invoke(main, ["export", "cifar10-resnet-v1.5", "--int8", "--out", str(tmp_path / "x.onnx")])
    assert no_data.exit_code == 2 and "--int8 needs --calibration-data" in no_data.output
    wrong_size = export(tmp_path / "y.onnx", "imagenet")
    assert wrong_size.exit_code == 2 and "error: the calibration images are [3, 224, 224]" in wrong_size.output
    assert "Traceback" not in wrong_size.output and not (tmp_path / "y.onnx").exists()
    assert export(out).exit_code == 2  # an existing file needs --force


def test_onnx_module_scores_a_file_like_a_model(tmp_path):
    from resnet_surgery import OnnxModule, evaluate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    x = torch.randn(3, 3, 8, 8)
    model(x)  # materialise the lazy layer
    export_onnx(model.eval(), tmp_path / "static.onnx", input_size=(3, 8, 8), dynamic_batch=False)
    onnx_model = OnnxModule(tmp_path / "static.onnx")
    assert onnx_model.batch == 1  # a static batch axis: the three images run one at a time
    with torch.no_grad():
        assert torch.allclose(onnx_model(x), model(x), atol=1e-5)
    report = evaluate(onnx_model, TensorDataset(x, torch.tensor([0, 1, 2])), reference=model, progress=False)
    assert report.agreement == 100.0 and report.num_images == 3
    with pytest.raises(SurgeryError, match="cannot load"):
        OnnxModule(tmp_path / "missing.onnx")
