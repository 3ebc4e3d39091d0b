"""Issue 17, items 3, 4, 5, 6, 7 and 10: the wrong teacher, int8 parity that means nothing, stage
classification, finetune on detection/segmentation models, finetune's NaN recovery path and misleading export
messages. One group per cause; each test fails on the main before the fix."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from util import one_line_error, run, write_random_images

from resnet_surgery import (
    ParityError,
    SurgeryError,
    convert,
    evaluate,
    export_int8,
    export_onnx,
    finetune,
    history,
    inspect,
    load,
    load_model,
    load_original,
    max_difference,
    save,
    transplant,
)
from resnet_surgery.deploy.quantize import QuantizationError, quantize_onnx
from resnet_surgery.engine.blocks import find_trunk
from resnet_surgery.engine.transplant import _conversion
from resnet_surgery.vocab import Layout
from resnet_surgery.zoo.cifar import cifar_resnet

SIZE = (3, 32, 32)




def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def same_function(a: nn.Module, b: nn.Module) -> bool:
    diff, scale = max_difference(a, b, input_size=SIZE)
    return diff <= 1e-5 * scale  # float rounding of an exact rewrite, not another function


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A flat folder of 24 random 32x32 images."""
    return write_random_images(tmp_path_factory.mktemp("images") / "imgs", 24, 32)


# --- 3. the wrong teacher -------------------------------------------------------------------------------


def test_a_transplants_teacher_is_its_source_with_its_weights(tmp_path):
    """calibrate/finetune without --original distilled towards the target's builder with random weights."""
    out = tmp_path / "t13"
    result = run("transplant", "cifar10-resnet-v1", "--weights", "DEFAULT", "--into", "cifar10-resnet-v1.5",
                 "--input-size", 32, "--out", out)
    assert result.exit_code == 0, result.output
    moved = load(out)
    teacher = load_original(moved)
    assert same_function(teacher, load_model("cifar10-resnet-v1", "DEFAULT"))
    assert same_function(teacher, moved)  # the transplant was exact: the teacher computes what it computes
    # a later conversion keeps the transplant's source as the teacher
    again = quiet(convert, moved, "v1.5", input_size=SIZE)
    assert history(again).recipe.function_source.model == "cifar10-resnet-v1"


def test_a_teacher_that_cannot_be_rebuilt_is_refused(tmp_path, images):
    custom = cifar_resnet("v1").eval()  # no recorded source: a custom model
    moved = quiet(transplant, custom, load_model("cifar10-resnet-v1.5"), input_size=SIZE)
    save(moved, tmp_path / "custom")
    one_line_error(run("calibrate", tmp_path / "custom", "--data", images, "--preset", "cifar10", "--steps", "bn",
                       "--num-images", 8, "--out", tmp_path / "h"), "cannot be built by name", "--original")
    assert not (tmp_path / "h").exists()
    random_source = quiet(transplant, load_model("cifar10-resnet-v1"), load_model("cifar10-resnet-v1.5"),
                          input_size=SIZE)
    with pytest.raises(SurgeryError, match="random weights"):
        load_original(random_source)


def test_a_weights_file_is_recorded_absolute_and_hashed(tmp_path, monkeypatch, images):
    """A relative --weights c15w.pt was stored relative to the working folder."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    trained = load_model("cifar10-resnet-v1.5", "DEFAULT")
    torch.save(trained.state_dict(), work / "c15w.pt")
    torch.save(cifar_resnet("v1.5").state_dict(), elsewhere / "c15w.pt")  # another file of the same name
    monkeypatch.chdir(work)
    source = history(load_model("cifar10-resnet-v1.5", "c15w.pt")).source
    assert source.weights == str(work / "c15w.pt") and len(source.weights_sha256) == 64
    assert run("convert", "cifar10-resnet-v1.5", "--weights", "c15w.pt", "--to", "v1", "--input-size", 32,
               "--out", work / "c1").exit_code == 0
    monkeypatch.chdir(elsewhere)
    assert same_function(load_original(load(work / "c1")), trained)
    torch.save(cifar_resnet("v1.5").state_dict(), work / "c15w.pt")  # the file changes under the recipe
    one_line_error(run("calibrate", work / "c1", "--data", images, "--preset", "cifar10", "--steps", "bn",
                       "--num-images", 8, "--out", elsewhere / "h"), "changed since it was recorded")
    assert not (elsewhere / "h").exists()


def tiny_pair(seed: int = 0):
    """A tiny v1 teacher (BatchNorm statistics from a few batches) and its approximate v1.5 conversion."""
    torch.manual_seed(seed)
    teacher = cifar_resnet("v1", widths=(8, 8, 16), blocks=(1, 1, 1), stem_width=8)
    teacher.train()
    with torch.no_grad():
        for _ in range(3):
            teacher(torch.randn(16, 3, 16, 16))
    teacher.eval()
    return teacher, quiet(convert, teacher, "v1.5", input_size=(3, 16, 16))


def synthetic(n: int = 16):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g))


def test_a_checkpoint_does_not_resume_towards_another_teacher(tmp_path):
    teacher, student = tiny_pair()
    ckpt = tmp_path / "ft.pt"
    finetune(student, teacher, synthetic(), epochs=3, batch_size=16, checkpoint=ckpt, max_steps=1, progress=False)
    other = tiny_pair(seed=1)[0]
    with pytest.raises(SurgeryError, match="different teacher"):
        finetune(student, other, synthetic(), epochs=3, batch_size=16, checkpoint=ckpt, resume=True,
                 progress=False)


# --- 4. int8 parity that means nothing ------------------------------------------------------------------


class Maps(nn.Module):
    """A segmentation-like model: one N x C x H x W map (or two, a pyramid)."""

    def __init__(self, outputs: int = 1):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 5, 3, padding=1)
        self.outputs = outputs

    def forward(self, x):
        y = self.conv2(F.relu(self.conv1(x)))
        return y if self.outputs == 1 else (y, F.max_pool2d(y, 2))


@pytest.mark.parametrize("outputs", [1, 2])
def test_int8_parity_of_maps_is_a_relative_error_per_output(tmp_path, images, outputs):
    torch.manual_seed(0)
    export_onnx(Maps(outputs).eval(), tmp_path / "m.onnx", input_size=SIZE)
    report = quantize_onnx(tmp_path / "m.onnx", tmp_path / "m8.onnx", images, num_images=8, parity_images=8,
                           preset="cifar10", progress=False)
    assert report.agreement is None and report.kl is None  # no classes: an agreement would count pixels
    assert len(report.output_errors) == outputs and all(0 <= e < report.max_output_error for e in report.output_errors)
    assert report.passed and "per output" in str(report) and (tmp_path / "m8.onnx").is_file()
    with pytest.raises(QuantizationError, match="above the bound"):
        quantize_onnx(tmp_path / "m.onnx", tmp_path / "bad.onnx", images, num_images=8, parity_images=8,
                      preset="cifar10", max_output_error=1e-9, progress=False)
    assert not (tmp_path / "bad.onnx").exists()


def test_agreement_of_a_model_without_class_logits_is_refused(images):
    with pytest.raises(SurgeryError, match="class logits"):
        evaluate(Maps().eval(), images, reference=Maps().eval(), preset="cifar10", progress=False)


def nan_classifier() -> nn.Module:
    model = cifar_resnet("v1", widths=(8, 8, 16), blocks=(1, 1, 1), stem_width=8).eval()
    with torch.no_grad():
        model.fc.weight.fill_(math.nan)
    return model


def test_quantize_onnx_refuses_a_file_whose_outputs_are_nan(tmp_path, images):
    fp32 = tmp_path / "nan.onnx"
    torch.onnx.export(nan_classifier(), (torch.randn(1, *SIZE),), str(fp32), dynamo=False,
                      input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    with pytest.raises(SurgeryError, match="NaN"):
        quantize_onnx(fp32, tmp_path / "nan8.onnx", images, num_images=8, parity_images=8, preset="cifar10",
                      min_agreement=0, progress=False)
    assert not (tmp_path / "nan8.onnx").exists()


@pytest.mark.slow
def test_cli_int8_of_a_segmentation_model_states_a_relative_error(tmp_path):
    calib = write_random_images(tmp_path / "calib", 8, 64)
    result = run("export", "deeplabv3_resnet50", "--input-size", 64, "--int8", "--calibration-data", calib,
                 "--size", 64, "--calibration-images", 4, "--parity-images", 4, "--out", tmp_path / "dl.onnx")
    assert result.exit_code == 0, result.output
    assert "||int8 - fp32|| / ||fp32|| per output" in result.output and "agreement" not in result.output


# --- 5. stage classification ----------------------------------------------------------------------------


def test_an_exact_dilated_stride_block_is_not_a_dilated_stage(tmp_path):
    exact15 = quiet(convert, load_model("cifar10-resnet-v1", "DEFAULT"), "v1.5", exact=True, input_size=SIZE)
    exact1 = quiet(convert, exact15, "v1", exact=True, input_size=SIZE)
    for model in (exact15, exact1):
        blocks = find_trunk(model).blocks
        assert blocks[0].layout is None and Layout.DILATED not in [b.layout for b in blocks]
        assert not any("dilation replaces the stride" in n for n in inspect(model, input_size=SIZE).notes)
    moved = quiet(transplant, exact15, load_model("cifar10-resnet-v1.5"), input_size=SIZE)  # was AttributeError
    assert same_function(moved, exact15)


def test_a_layout_mismatch_with_a_stride_1_block_is_one_clear_error():
    blocks = find_trunk(load_model("cifar10-resnet-v1")).blocks
    src = [dataclass_copy(b) for b in blocks]
    src[0].layout = Layout.DILATED  # the source calls it a dilated stage, the target has no layout there
    with pytest.raises(SurgeryError, match="no conversion maps one to the other"):
        _conversion(src, blocks)


def dataclass_copy(block):
    import dataclasses

    return dataclasses.replace(block)


# --- 6. finetune on detection and segmentation models ---------------------------------------------------


@pytest.mark.parametrize("name", ["fasterrcnn_resnet50_fpn", "deeplabv3_resnet50"])
def test_finetune_refuses_a_detection_or_segmentation_model_before_any_work(tmp_path, name):
    data = write_random_images(tmp_path / "imgs", 4, 64)
    original = load_model(name)
    converted = quiet(convert, original, "v1", input_size=(3, 64, 64))  # torchvision's are v1.5
    with pytest.raises(SurgeryError, match="calibrate"):
        finetune(converted, original, data, epochs=1, batch_size=2, preset="cifar10", progress=False)


# --- 7. finetune's NaN recovery path --------------------------------------------------------------------


def finite(path) -> bool:
    state = torch.load(path, weights_only=True)["model"]
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_a_divergence_keeps_a_finite_checkpoint_and_resumes_at_a_lower_lr(tmp_path):
    teacher, student = tiny_pair()
    ckpt = tmp_path / "ft.pt"
    with pytest.raises(SurgeryError):
        finetune(student, teacher, synthetic(), epochs=3, batch_size=16, lr=math.nan, checkpoint=ckpt,
                 progress=False)
    assert not ckpt.exists() or finite(ckpt)  # never a NaN "last good checkpoint"
    finetune(student, teacher, synthetic(), epochs=3, batch_size=16, lr=0.05, checkpoint=ckpt, force=True,
             max_steps=1, progress=False)
    # the advice "lower the learning rate and resume" is taken
    resumed = finetune(student, teacher, synthetic(), epochs=3, batch_size=16, lr=0.01, checkpoint=ckpt,
                       resume=True, progress=False)
    report = history(resumed).finetune
    assert report.start_epoch == 1 and report.steps == 2 and finite(ckpt)


def test_nan_weights_after_an_epoch_are_never_checkpointed(tmp_path, monkeypatch):
    teacher, student = tiny_pair()
    ckpt = tmp_path / "ft.pt"
    step = torch.optim.SGD.step

    def poison(self, *args, **kwargs):  # the loss is finite but the update is not: weights turn NaN
        out = step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(math.nan)
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", poison)
    with pytest.raises(SurgeryError, match="weights became nan"):
        finetune(student, teacher, synthetic(), epochs=3, batch_size=16, checkpoint=ckpt, progress=False)
    assert not ckpt.exists()


# --- 10. misleading messages ----------------------------------------------------------------------------


def test_a_nan_models_export_says_nan_not_tolerance(tmp_path):
    with pytest.raises(ParityError) as e:
        export_onnx(nan_classifier(), tmp_path / "n.onnx", input_size=SIZE)
    assert "NaN" in str(e.value) and "loosen" not in str(e.value) and not (tmp_path / "n.onnx").exists()


def test_an_int8_exports_fp32_failure_names_out_not_the_staged_file(tmp_path, images):
    out = tmp_path / "n8.onnx"
    with pytest.raises(ParityError) as e:
        export_int8(nan_classifier(), out, images, input_size=SIZE, preset="cifar10", num_images=8,
                    parity_images=8, progress=False)
    assert f"nothing written to {out}" in str(e.value) and ".export" not in str(e.value)
    assert e.value.report.path == str(out) and list(tmp_path.iterdir()) == []


def test_found_writing_the_raises_sections_each_is_one_surgery_error(tmp_path):
    """Found reading each public function for its Raises: section: a bare KeyError (weights a torchvision enum
    does not have, an ONNX input that is a sequence), matplotlib's ValueError (plotting no sites), torch's
    RuntimeError (a probe at a size the models do not take; cifar_resnet with num_classes=-1)."""
    import onnx
    from onnx import TensorProto, helper

    from resnet_surgery import cifar_resnet as build
    from resnet_surgery import model_transform, onnx_input_shape, plot_sites
    from resnet_surgery.history import Source, record

    model = record(cifar_resnet("v1.5"), source=Source("resnet18", "torchvision", "IMAGENET1K_V9"))
    with pytest.raises(SurgeryError, match="weights 'IMAGENET1K_V9' of torchvision's 'resnet18'"):
        model_transform(model)
    with pytest.raises(SurgeryError, match="no sites to plot"):
        plot_sites([], tmp_path / "p.png")
    with pytest.raises(SurgeryError, match="does not run on a 1x32x32 input"):
        max_difference(cifar_resnet("v1.5"), cifar_resnet("v1.5"), (1, 32, 32))
    with pytest.raises(SurgeryError, match="from 1 to 4096"):
        build(num_classes=-1)
    sequence = helper.make_tensor_sequence_value_info("x", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("SequenceLength", ["x"], ["y"])], "g", [sequence],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [])])
    onnx.save(helper.make_model(graph), tmp_path / "seq.onnx")
    with pytest.raises(SurgeryError, match="is not a tensor of a known element type"):
        onnx_input_shape(tmp_path / "seq.onnx")


def test_found_by_a_review_of_the_options_objects_each_is_one_error(tmp_path):
    """Found reviewing the new options objects: fields that reached numpy or torch unchecked (peak_matmul_n=-1,
    parity_batch=0, n_resamples=2^63, a seed past 2^64) and min_time_s=nan (rounds without end)."""
    from resnet_surgery import ExportOptions, compare_latency, ratio_ci

    export_onnx(cifar_resnet("v1.5"), tmp_path / "a.onnx", input_size=SIZE)
    for fields, needle in (({"peak_matmul_n": -1}, "peak_matmul_n from 1"), ({"min_time_s": math.nan}, "finite times"),
                           ({"warmup": 2**63}, "warmup from 0"), ({"ci_target": 0.0}, "ci_target > 0")):
        with pytest.raises(SurgeryError, match=needle):
            compare_latency({"a": tmp_path / "a.onnx"}, progress=False, **fields)
    for options in (ExportOptions(parity_batch=0), ExportOptions(seed=2**64)):
        with pytest.raises(SurgeryError, match="parity_batch takes an integer from 1"):
            export_onnx(cifar_resnet("v1.5"), tmp_path / "b.onnx", input_size=SIZE, options=options)
    assert not (tmp_path / "b.onnx").exists()
    with pytest.raises(SurgeryError, match="n_resamples from 1 to 10\\^6"):
        ratio_ci([1.0, 2.0], [1.0, 2.0], n_resamples=2**63)
