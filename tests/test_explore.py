import importlib
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch.utils.data import TensorDataset

from resnet_surgery import SurgeryError, explore, pareto_front
from resnet_surgery.cli import main
from resnet_surgery.zoo.cifar import cifar_resnet

explore_module = importlib.import_module("resnet_surgery.workflows.explore")  # the package's `explore` is the function

FAST = {"min_time_s": 0.05, "max_time_s": 0.1, "progress": False}  # tests never assert timings
SIZE = (3, 16, 16)


def tiny_model():
    torch.manual_seed(0)
    return cifar_resnet("v1.5", widths=(4, 8, 8), blocks=(1, 1, 1)).eval()


def labelled(n=96):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, *SIZE, generator=g), torch.randint(0, 10, (n,), generator=g))


def test_pareto_front_on_constructed_numbers():
    # (latency ratio, accuracy): lower cost and higher value win.
    points = [(1.0, 80.0), (0.9, 79.0), (0.8, 70.0), (0.95, 78.0), (1.1, 81.0), (1.2, 80.5), (0.8, 69.0), (1.0, 80.0)]
    assert pareto_front(points) == [True, True, True, False, True, False, False, True]
    assert pareto_front([(1.0, 50.0)]) == [True]
    assert pareto_front([]) == []


def test_explore_end_to_end_and_resume(tmp_path, monkeypatch):
    out = tmp_path / "explore"
    model, data = tiny_model(), labelled()
    kwargs = dict(input_size=SIZE, calibrate_images=32, eval_images=32, quant_images=16, min_agreement=0,
                  batch_size=16, out=out, **FAST)
    report = explore(model, data, **kwargs)

    rows = {c.name: c.to_dict() for c in report.candidates}
    ok = ["original", "original-int8", "v1", "v1-int8", "d", "d-int8", "v1-pruned", "v1-pruned-int8"]
    assert list(rows) == ["original", "original-int8", "v1", "v1-int8", "v1.5", "d", "d-int8", "v1-pruned",
                          "v1-pruned-int8", "v1.5-exact"]
    assert [n for n, c in rows.items() if c["status"] == "ok"] == ok
    assert rows["v1.5"]["status"].startswith("skipped") and "made from a v1 model" in rows["v1.5-exact"]["status"]
    assert report.metric == "top1" and rows["original"]["eval"]["agreement"] == 100.0
    assert rows["v1"]["recovery"].startswith("recover: ") and rows["v1-pruned"]["exact"] is False
    assert [st["stage"] for st in rows["v1"]["recover"]["stages"]] == ["naive copy", "bn", "calibrate"]
    assert rows["v1-pruned"]["macs"] < rows["v1"]["macs"] and rows["d-int8"]["quantization"]["parity_images"] == 32
    # One latency run timed every kept candidate against the original.
    assert list(report.latency["models"]) == ok and report.latency["batch_sizes"] == [1]
    for name in ok:
        c = rows[name]
        assert c["latency"]["1"]["p50_ms"] > 0 and isinstance(c["pareto"]["1"], bool)
        assert c["eval"]["num_images"] == 32 and (out / "candidates" / name / "model.onnx").is_file()
    timed = [rows[n] for n in ok]
    assert [c["pareto"]["1"] for c in timed] == pareto_front([(c["latency"]["1"]["ratio"], c["eval"]["top1"])
                                                              for c in timed])
    saved = json.loads((out / "explore.json").read_text())
    assert set(saved) == {"model", "metric", "settings", "candidates", "latency", "seconds", "latency_seconds"}
    assert 0 < saved["latency_seconds"] <= saved["seconds"]
    assert saved["candidates"][2]["name"] == "v1" and "recover" in saved["candidates"][2]
    assert (out / "explore.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "v1-pruned-int8" in str(report) and "front b1" in str(report)

    # A rerun reuses every finished candidate; a candidate killed half-way (no folder) is rebuilt alone.
    shutil.rmtree(out / "candidates" / "d-int8")
    calls = []
    monkeypatch.setattr(explore_module, "recover", lambda *a, **k: pytest.fail("recovered a finished candidate"))
    monkeypatch.setattr(explore_module, "export_onnx", lambda *a, **k: pytest.fail("re-exported a finished candidate"))
    real_quantize = explore_module.quantize_onnx
    monkeypatch.setattr(explore_module, "quantize_onnx", lambda fp32, *a, **k: calls.append(fp32) or real_quantize(fp32, *a, **k))
    again = explore(model, data, **kwargs)
    assert [p.parent.name for p in calls] == ["d"]
    figures = lambda c: {k: v for k, v in c["eval"].items() if k != "seconds"}  # noqa: E731
    assert [figures(c.to_dict()) for c in again.candidates if c.status == "ok"] == [figures(rows[n]) for n in ok]


@pytest.mark.slow
def test_explore_without_labels_ranks_by_agreement_and_narrows(tmp_path, monkeypatch):
    images = TensorDataset(labelled().tensors[0])
    calls = []
    real_recover = explore_module.recover
    monkeypatch.setattr(explore_module, "recover", lambda *a, **k: calls.append(
        (k["options"].calibrate_images, k["options"].stages, k["budget"])) or real_recover(*a, **k))
    report = explore(tiny_model(), images, input_size=SIZE, variants=["d"], int8=False, calibrate_images=16,
                     eval_images=16, batch_size=16, out=tmp_path / "x", **FAST)
    assert report.metric == "agreement" and [c.name for c in report.candidates] == ["original", "d"]
    assert report.candidates[1].eval["top1"] is None and 0 <= report.candidates[1].eval["agreement"] <= 100
    # Other settings: the finished candidate is not reused.
    again = explore(tiny_model(), images, input_size=SIZE, variants=["d"], int8=False, calibrate_images=8,
                    eval_images=16, batch_size=16, out=tmp_path / "x", **FAST)
    # Other recover stages and a budget: rebuilt too, with those.
    explore(tiny_model(), images, input_size=SIZE, variants=["d"], int8=False, calibrate_images=8,
            stages=("bn",), budget=600, eval_images=16, batch_size=16, out=tmp_path / "x", **FAST)
    assert calls == [(16, ("bn", "calibrate"), None), (8, ("bn", "calibrate"), None), (8, ("bn",), 600)]
    assert again.settings["calibrate_images"] == 8


def test_explore_bad_input(tmp_path):
    model = tiny_model()
    with pytest.raises(SurgeryError, match="eval_data .* has no labels"):
        explore(model, labelled(), eval_data=TensorDataset(torch.randn(4, *SIZE)), input_size=SIZE, out=tmp_path / "a")
    with pytest.raises(SurgeryError, match="dataset is empty"):
        explore(model, TensorDataset(torch.randn(0, *SIZE)), input_size=SIZE, out=tmp_path / "b")
    with pytest.raises(SurgeryError, match="unknown variant 'v2'"):
        explore(model, labelled(), variants=["v2"], out=tmp_path / "c")
    with pytest.raises(SurgeryError, match="unknown recover stage 'bm'"):
        explore(model, labelled(), stages=("bm",), out=tmp_path / "c")
    with pytest.raises(SurgeryError, match="budget must be a number > 0"):
        explore(model, labelled(), budget=0, out=tmp_path / "c")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(SurgeryError, match="is not an explore folder"):
        explore(model, labelled(), input_size=SIZE, out=tmp_path / "mine")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def image_folder(root, n, labelled_folders: bool):
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        folder = root / f"class{i % 2}" if labelled_folders else root
        folder.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_cli_explore_bad_input_is_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    flat = image_folder(tmp_path / "flat", 4, labelled_folders=False)
    for args, message in [
        (["--data", empty], "holds no images"),
        (["--data", flat, "--eval-data", flat], "has no labels"),
        (["--data", flat, "--variants", "v1,v3"], "unknown variant 'v3'"),
    ]:
        result = CliRunner().invoke(main, ["explore", "cifar10-resnet-v1.5", "--preset", "cifar10", "--out",
                                           str(tmp_path / "out"), *map(str, args)])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_explore_runs_and_prints_json(tmp_path):
    data = image_folder(tmp_path / "data", 48, labelled_folders=True)
    # No --preset: the CIFAR-10 model's own preprocessing, and its 32x32 input size.
    args = ["explore", "cifar10-resnet-v1.5", "--weights", "DEFAULT", "--data", data,
            "--variants", "v1", "--no-int8", "--calibrate-images", "16", "--eval-images", "16", "--min-time", "0.05",
            "--max-time", "0.1", "--out", tmp_path / "out"]
    result = CliRunner().invoke(main, [str(a) for a in args] + ["--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output[result.output.index("{\n"):])
    assert [c["name"] for c in payload["candidates"]] == ["original", "v1"] and payload["metric"] == "top1"
    assert payload["settings"]["input_size"] == [3, 32, 32]
    table = CliRunner().invoke(main, [str(a) for a in args])  # resumed: both candidates reused
    assert table.exit_code == 0 and "ratio b1" in table.output and "explore.json" in table.output


def test_explore_sizes_images_like_the_models_own_preprocessing():
    # Without --preset, explore prepares images (and exports at the size) the model's weights were published with.
    import torchvision

    from resnet_surgery import load_model, model_transform
    from resnet_surgery.data import preset_transform, transform_size

    assert transform_size(model_transform(load_model("cifar10-resnet-v1.5", "DEFAULT"))) == 32
    assert transform_size(preset_transform("imagenet", size=64)) == 64
    assert transform_size(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.transforms()) == 224
    assert transform_size(lambda image: image) is None
