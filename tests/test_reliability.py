"""Issue 17, items 1, 8, 9, 11 and 12: bad inputs that ended silently wrong, in a traceback, after the expensive
work or outside --out. Grouped by cause; each test fails on the code before the fix."""

import importlib
import json
import shutil
import warnings

import pytest
import torch
from torch.utils.data import TensorDataset
from util import one_line_error, run, write_random_images

import resnet_surgery as rs
from resnet_surgery import SurgeryError, SurgeryNotice
from resnet_surgery.zoo.cifar import cifar_resnet

explore_module = importlib.import_module("resnet_surgery.workflows.explore")
quantize_module = importlib.import_module("resnet_surgery.deploy.quantize")

FAST = {"min_time_s": 0.05, "max_time_s": 0.1, "progress": False}
SIZE = (3, 16, 16)
EXPLORE = dict(input_size=SIZE, variants=["d"], calibrate_images=16, stages=("bn",), eval_images=16,
               quant_images=8, min_agreement=0, batch_size=16, **FAST)
TIMING = ["--min-time", "0.05", "--max-time", "0.1"]




def tiny_model():
    torch.manual_seed(0)
    return cifar_resnet("v1.5", widths=(4, 8, 8), blocks=(1, 1, 1)).eval()


def labelled(n=64):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, *SIZE, generator=g), torch.randint(0, 10, (n,), generator=g))


def class_folders(root, classes, per_class=2, size=32):
    for i in range(classes):
        write_random_images(root / f"c{i:02d}", per_class, size, seed=i)
    return root


@pytest.fixture(autouse=True)
def _no_peak_measurement(monkeypatch):
    """The machine's matmul peak takes seconds to measure and no test here reads it."""
    monkeypatch.setattr(importlib.import_module("resnet_surgery.deploy.latency"), "measure_peak_gflops",
                        lambda *a, **k: 100.0)


def no_work(*args, **kwargs):
    pytest.fail("the expensive work started before the input was checked")


# --- 1. explore reads its own earlier files as input: never a path out of --out, damaged files rebuilt ---------

@pytest.fixture(scope="module")
def finished_explore(tmp_path_factory):
    """A finished explore of the tiny model (original, d and their int8 files), built once."""
    out = tmp_path_factory.mktemp("finished") / "ex"
    explore_module.explore(tiny_model(), labelled(), out=out, **EXPLORE)
    return out


def rerun(tmp_path, finished, damage):
    """Copy the finished explore, damage it, rerun it; the victim folder beside it must stay untouched."""
    out = tmp_path / "run" / "ex"
    shutil.copytree(finished, out)
    victim = tmp_path / "victim"
    victim.mkdir()
    shutil.copy(out / "candidates" / "d" / "model.onnx", victim / "model.onnx")
    (tmp_path / "victim-int8").mkdir()
    (tmp_path / "victim-int8" / "keep.txt").write_text("precious")
    damage(out / "candidates", victim)
    report = explore_module.explore(tiny_model(), labelled(), out=out, **EXPLORE)
    assert (tmp_path / "victim-int8" / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "victim", "victim-int8"]
    assert sorted(p.name for p in victim.iterdir()) == ["model.onnx"]
    assert [c.name for c in report.candidates] == ["original", "original-int8", "d", "d-int8"]
    assert all(str(tmp_path / "run") in p for p in report.latency["models"].values())
    return report


def edit_result(folder, **changes):
    result = json.loads((folder / "result.json").read_text())
    (folder / "result.json").write_text(json.dumps({**result, **changes}))


@pytest.mark.parametrize("name", ["../../victim", "ABSOLUTE", "original"])
def test_explore_never_uses_a_name_from_its_files_as_a_path(tmp_path, finished_explore, name):
    name = str(tmp_path / "victim") if name == "ABSOLUTE" else name
    rerun(tmp_path, finished_explore, lambda cands, victim: edit_result(cands / "d", name=name))


@pytest.mark.parametrize("text", ["{not json", "[]", "EVAL_LIST", "[" * 100000])
def test_explore_rebuilds_a_damaged_result(tmp_path, finished_explore, text, monkeypatch):
    def damage(cands, victim):
        if text == "EVAL_LIST":  # the right settings, the wrong shape
            return edit_result(cands / "d", eval=[])
        (cands / "d" / "result.json").write_text(text)
    calls = []
    real = explore_module.export_onnx
    monkeypatch.setattr(explore_module, "export_onnx", lambda m, path, **k: calls.append(path) or real(m, path, **k))
    rerun(tmp_path, finished_explore, damage)
    assert [p.parent.parent.name for p in calls] == ["candidates"] and len(calls) == 1  # d alone was rebuilt


def test_explore_rebuilds_a_candidate_without_its_onnx_file(tmp_path, finished_explore):
    report = rerun(tmp_path, finished_explore, lambda cands, victim: (cands / "d" / "model.onnx").unlink())
    assert report.candidates[2].status == "ok"


def test_explore_never_reads_through_a_linked_candidate(tmp_path, finished_explore, monkeypatch):
    out, outside = tmp_path / "run" / "ex", tmp_path / "outside-d"
    shutil.copytree(finished_explore, out)
    shutil.move(out / "candidates" / "d", outside)
    (out / "candidates" / "d").symlink_to(outside, target_is_directory=True)
    before = {p.name: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    calls = []
    real = explore_module.export_onnx
    monkeypatch.setattr(explore_module, "export_onnx", lambda m, path, **k: calls.append(path) or real(m, path, **k))
    explore_module.explore(tiny_model(), labelled(), out=out, **EXPLORE)
    assert len(calls) == 1 and not (out / "candidates" / "d").is_symlink()  # rebuilt inside, the link removed
    assert {p.name: p.read_bytes() for p in outside.rglob("*") if p.is_file()} == before  # nothing outside read as ours or changed


def test_explore_refuses_a_linked_candidates_folder(tmp_path, finished_explore):
    out = tmp_path / "ex"
    out.mkdir()
    shutil.copytree(finished_explore / "candidates", tmp_path / "elsewhere")
    (out / "candidates").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(SurgeryError, match="never writes through it"):
        explore_module.explore(tiny_model(), labelled(), out=out, **EXPLORE)


# --- 8. labels checked against the model's classes, before the work ----------------------------------------------

@pytest.mark.parametrize("command", ["explore", "evaluate"])
def test_more_class_folders_than_classes_is_refused(tmp_path, command, monkeypatch):
    data = class_folders(tmp_path / "data", 12)
    monkeypatch.setattr(explore_module, "export_onnx", no_work)
    common = ["cifar10-resnet-v1", "--weights", "DEFAULT", "--preset", "cifar10", "--data", data]
    if command == "explore":
        result = run("explore", *common, "--eval-data", data, "--variants", "d", "--out", tmp_path / "ex", *TIMING)
    else:
        result = run("evaluate", *common)
    one_line_error(result, "12 class folders", "10 classes")
    assert not (tmp_path / "ex" / "candidates").exists()


def test_fewer_class_folders_than_classes_warns_with_both_counts(tmp_path):
    data = class_folders(tmp_path / "data", 3)
    model = rs.load_model("cifar10-resnet-v1", "DEFAULT")
    with pytest.warns(SurgeryNotice, match="3 class folders but the model has 10 classes"):
        rs.evaluate(model, data, preset="cifar10", progress=False)


def test_evaluate_refuses_labels_beyond_the_classes_of_a_plain_dataset():
    data = TensorDataset(torch.randn(4, *SIZE), torch.tensor([0, 1, 2, 11]))
    with pytest.raises(SurgeryError, match="a label is 11 but the model has 10 classes"):
        rs.evaluate(tiny_model(), data, progress=False)


# --- 9. options and data checked before the expensive work -------------------------------------------------------

@pytest.mark.parametrize("images", [0, 1])
def test_export_int8_checks_the_calibration_images_before_the_fp32_export(tmp_path, monkeypatch, images):
    data = tmp_path / "calib"
    write_random_images(data, images, 32) if images else data.mkdir()
    monkeypatch.setattr(quantize_module, "export_onnx", no_work)
    result = run("export", "cifar10-resnet-v1", "--weights", "DEFAULT", "--input-size", 32, "--int8",
                 "--calibration-data", data, "--preset", "cifar10", "--out", tmp_path / "m.onnx")
    one_line_error(result, "image" if images == 0 else "one image")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib"]


def test_export_int8_checks_the_image_size_before_the_fp32_export(tmp_path, monkeypatch):
    write_random_images(tmp_path / "calib", 8, 32)
    monkeypatch.setattr(quantize_module, "export_onnx", no_work)
    with pytest.raises(SurgeryError, match=r"\[3, 32, 32\] but the model takes \[3, 64, 64\]"):
        rs.export_int8(tiny_model(), tmp_path / "m.onnx", tmp_path / "calib", input_size=64, preset="cifar10")


def test_explore_checks_the_input_size_before_building_the_original(tmp_path, monkeypatch):
    data = class_folders(tmp_path / "data", 10)
    monkeypatch.setattr(explore_module, "export_onnx", no_work)
    result = run("explore", "cifar10-resnet-v1.5", "--weights", "DEFAULT", "--preset", "cifar10", "--input-size", 64,
                 "--data", data, "--variants", "d", "--out", tmp_path / "ex", *TIMING)
    one_line_error(result, "[3, 32, 32]", "[3, 64, 64]")
    assert not (tmp_path / "ex" / "candidates").exists()


@pytest.mark.parametrize("option, value, needle", [
    ("batch_sizes", (0,), "batch sizes must be positive"), ("calibrate_images", 0, "calibrate_images"),
    ("quant_images", 0, "quant_images"), ("stages", ("bn", "features", "fine"), "unknown recover stage 'fine'"),
    ("target", float("nan"), "target must be a number > 0"), ("budget", -1.0, "budget must be a number > 0"),
    ("min_agreement", 101, "min_agreement"), ("threads", 0, "threads"),
])
def test_explore_checks_options_before_any_candidate(tmp_path, monkeypatch, option, value, needle):
    monkeypatch.setattr(explore_module, "export_onnx", no_work)
    monkeypatch.setattr(explore_module, "recover", no_work)
    with pytest.raises(SurgeryError, match=needle):
        explore_module.explore(tiny_model(), labelled(), out=tmp_path / "ex", **{**EXPLORE, option: value})
    assert not (tmp_path / "ex" / "candidates").exists()


# --- 11. the Python API: a wrong type is one clear error naming the argument --------------------------------------

def api_calls(tmp_path):
    model = tiny_model()
    return {
        "convert name": (lambda: rs.convert("resnet50", "v1"), TypeError, "model takes a torch nn.Module"),
        "export name": (lambda: rs.export_onnx("resnet18", tmp_path / "a.onnx"), TypeError, "load_model('resnet18')"),
        "export_int8 name": (lambda: rs.export_int8("resnet18", tmp_path / "b.onnx", tmp_path), TypeError, "model takes"),
        "inspect name": (lambda: rs.inspect("resnet50"), TypeError, "model takes a torch nn.Module"),
        "transplant None": (lambda: rs.transplant(None, model), TypeError, "source takes a torch nn.Module"),
        "transplant into None": (lambda: rs.transplant(model, None), TypeError, "target takes"),
        "compare_latency list": (lambda: rs.compare_latency([tmp_path / "a.onnx"]), TypeError, "models takes a dict"),
        "evaluate name": (lambda: rs.evaluate("resnet18", labelled()), TypeError, "model takes"),
        "explore name": (lambda: rs.explore("resnet18", labelled(), out=tmp_path / "ex"), TypeError, "model takes"),
        "save name": (lambda: rs.save("resnet18", tmp_path / "s"), TypeError, "model takes"),
        "max_difference": (lambda: rs.max_difference(model, "x"), TypeError, "b takes"),
        "input_size float": (lambda: rs.export_onnx(model, tmp_path / "c.onnx", input_size=32.0), TypeError,
                             "input_size takes"),
    }


@pytest.mark.parametrize("case", list(api_calls(None)))
def test_api_wrong_type_is_one_clear_error(tmp_path, case):
    call, error, needle = api_calls(tmp_path)[case]
    with pytest.raises(error, match=needle.replace("(", r"\(").replace(")", r"\)")):
        call()
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("entry", ["export_onnx", "inspect", "count_macs", "max_difference"])
def test_api_input_size_takes_an_int(tmp_path, entry):
    model = tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calls = {"export_onnx": lambda: rs.export_onnx(model, tmp_path / "m.onnx", input_size=16).passed,
                 "inspect": lambda: rs.inspect(model, input_size=16).macs,
                 "count_macs": lambda: rs.count_macs(model, input_size=16),
                 "max_difference": lambda: rs.max_difference(model, model, input_size=16)[1]}
        assert calls[entry]()


# --- 12. loading a folder never reaches the network ---------------------------------------------------------------

@pytest.mark.parametrize("source", ["timm:hf-hub:evil/repo", "timm:local-dir:/tmp/evil", "timm:../evil"])
def test_a_hub_name_in_a_recipe_is_refused_without_downloading(tmp_path, monkeypatch, source):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = rs.convert(rs.load_model("cifar10-resnet-v1.5"), "v1", input_size=32)
    folder = rs.save(converted, tmp_path / "m")
    recipe = json.loads((folder / "recipe.json").read_text())
    recipe["source"] = {**recipe["source"], "model": source, "kind": "timm"}
    (folder / "recipe.json").write_text(json.dumps(recipe))
    timm = pytest.importorskip("timm")
    monkeypatch.setattr(timm, "create_model", no_work)
    one_line_error(run("inspect", folder), source, "never downloads")
    with pytest.raises(SurgeryError, match="never downloads"):
        rs.load_model(folder)
