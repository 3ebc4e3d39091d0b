"""Detection and segmentation models: the ResNet trunk found inside the whole model, rewritten in place."""

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF
from click.testing import CliRunner
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models.resnet import Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d
from util import CaffeResNet, randomize_bn

from resnet_surgery import (
    SurgeryNotice,
    apply_recipe,
    convert,
    export_onnx,
    find_trunk,
    history,
    inspect,
    load,
    load_model,
    max_difference,
    save,
)
from resnet_surgery.cli import main
from resnet_surgery.errors import TraceError
from resnet_surgery.recovery.batchnorm import reestimate_bn
from resnet_surgery.vocab import Layout, Variant
from resnet_surgery.zoo.registry import DETECTION_MODELS, FROZEN_BN_MODELS, SEGMENTATION_MODELS

# The ten models of issue 10 (the _v2 mask/retina variants load too, but are not listed there).
MODELS = ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn",
          "retinanet_resnet50_fpn", "fcos_resnet50_fpn", *SEGMENTATION_MODELS)
SIZE = (3, 64, 64)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeryNotice)
        return fn(*args, **kwargs)


def test_every_model_is_found_inside_the_whole_model_and_converted_in_place():
    assert set(MODELS) <= set(DETECTION_MODELS + SEGMENTATION_MODELS)
    for name in MODELS:
        model = load_model(name)
        trunk = find_trunk(model)
        detection = name not in SEGMENTATION_MODELS
        # A detection model is not fx-traceable: its backbone (ResNet + FPN) is; a segmentation model traces whole.
        assert trunk.name == ("backbone" if detection else ""), name
        body = "backbone.body." if detection else "backbone."
        # The FPN's top-down sums are not residual blocks: exactly the ResNet's 16 (resnet50) or 33 (resnet101).
        assert len(trunk.blocks) == (33 if name.endswith("101") else 16), name
        assert all(b.name.startswith(body + "layer") for b in trunk.blocks), name
        layouts = {b.name.removeprefix(body): b.layout for b in trunk.blocks if b.layout}
        if detection:
            assert layouts == {"layer2.0": Layout.V1_5, "layer3.0": Layout.V1_5, "layer4.0": Layout.V1_5}, name
        else:  # replace_stride_with_dilation=[False, True, True]
            assert layouts == {"layer2.0": Layout.V1_5, "layer3.0": Layout.DILATED, "layer4.0": Layout.DILATED}, name
        norm = FrozenBatchNorm2d if name in FROZEN_BN_MODELS else nn.BatchNorm2d
        assert all(type(model.get_submodule(f"{trunk.name}.{n}" if trunk.name else n)) is norm
                   for b in trunk.blocks for n in b.norms), name
        converted = quiet(convert, model, "v1", input_size=SIZE)
        assert type(converted) is type(model)
        recipe = history(converted).recipe
        assert [r.block for r in recipe.rewrites] == [f"{body}layer{i}.0" for i in (2, 3, 4)][: 3 if detection else 1]
        assert not recipe.exact and recipe.trunk == (trunk.name or None)
        assert any("approximate" in n for n in recipe.notices)
        for r in recipe.rewrites:  # names in the recipe are full paths in the whole model
            assert all(isinstance(converted.get_submodule(n), norm) for n in r.norms)
            assert all(isinstance(converted.get_submodule(c), nn.Conv2d) for c in r.convs)
        first = converted.get_submodule(f"{body}layer2.0.conv1")
        assert first.stride == (2, 2) and model.get_submodule(f"{body}layer2.0.conv1").stride == (1, 1)
        d = quiet(convert, model, "d", input_size=SIZE)
        assert isinstance(d.get_submodule(f"{body}layer2.0.downsample.0.0"), nn.AvgPool2d), name
        # The dead-compute pass prunes only where no feature-pyramid level reads the stage output.
        pruned = quiet(convert, converted, prune_dead=True, input_size=SIZE)
        taps_c2 = detection and not name.startswith(("retinanet", "fcos"))
        assert [r.block for r in history(pruned).recipe.rewrites] == ([] if taps_c2 else [f"{body}layer2.0"]), name
        diff, scale = max_difference(converted, pruned, SIZE)
        assert diff / scale <= 1e-5, name


def test_dilated_stages_have_nothing_to_move():
    model = load_model("deeplabv3_resnet50")
    report = inspect(model, SIZE)
    rows = {b.name: b for b in report.blocks}
    assert rows["backbone.layer3.0"].stride_on == "dilated" and rows["backbone.layer3.0"].stride == 1
    assert rows["backbone.layer4.0"].stride_on == "dilated" and rows["backbone.layer4.0"].out_shape[1:] == [8, 8]
    assert any("backbone.layer3.0, backbone.layer4.0: dilation replaces the stride" in n for n in report.notes)
    with pytest.warns(SurgeryNotice, match="dilation replaces the stride"):
        d = convert(model, "d", input_size=SIZE)
    assert [r.block for r in history(d).recipe.rewrites] == ["backbone.layer2.0"]
    v1 = quiet(convert, model, "v1", input_size=SIZE)
    exact = convert(v1, "v1.5", exact=True, input_size=SIZE)
    for m in (d, v1, exact):  # the dilated stages are untouched
        for name in ("backbone.layer3.0.conv2", "backbone.layer4.0.conv2", "backbone.layer4.1.conv2"):
            assert m.get_submodule(name).dilation == model.get_submodule(name).dilation
            assert m.get_submodule(name).stride == (1, 1)
        assert m.get_submodule("backbone.layer3.0.downsample.0").stride == (1, 1)
    diff, scale = max_difference(v1, exact, (3, 65, 65))
    assert diff / scale <= 1e-5
    assert exact.get_submodule("backbone.layer2.0.conv2").dilation == (2, 2)


def test_fpn_taps_are_left_alone_by_prune_dead_and_named(tmp_path):
    faster = quiet(convert, load_model("fasterrcnn_resnet50_fpn"), "v1", input_size=SIZE)
    report = inspect(faster, SIZE)
    assert report.trunk == "backbone" and report.dead == []
    # Every stage output feeds the FPN at full resolution: no site can be pruned, and each says who reads it.
    for i, stage in ((2, 0), (3, 1), (4, 2)):
        assert any(n.startswith(f"backbone.body.layer{i}.0: its input") and f"backbone.fpn.inner_blocks.{stage}.0" in n
                   for n in report.notes), report.notes
    # RetinaNet's pyramid starts at C3: layer1's output is read by layer2.0 only, so that site is pruned.
    retina = quiet(convert, load_model("retinanet_resnet50_fpn"), "v1", input_size=SIZE)
    pruned = quiet(convert, retina, prune_dead=True, input_size=SIZE)
    recipe = history(pruned).recipe
    assert [r.block for r in recipe.rewrites] == ["backbone.body.layer2.0"]
    assert recipe.rewrites[0].absorbed == ["backbone.body.layer1.2.conv2"]
    assert any("backbone.body.layer3.0" in n and "backbone.fpn.inner_blocks.0.0" in n for n in recipe.notices)
    assert isinstance(pruned.backbone, torch.fx.GraphModule) and pruned.backbone.out_channels == 256
    for size in (64, 65):
        diff, scale = max_difference(retina, pruned, (3, size, size))
        assert diff / scale <= 1e-5
    # The whole model still runs with the pruned backbone, and save/load replays the recipe by full names.
    save(pruned, tmp_path / "r")
    again = load(tmp_path / "r")
    assert type(again) is type(retina) and history(again).recipe.trunk == "backbone"
    assert max_difference(pruned, again, SIZE)[0] == 0
    torch.testing.assert_close(pruned.state_dict(), again.state_dict(), rtol=0, atol=0)
    with torch.no_grad():
        out = again.eval()([torch.rand(3, 64, 64)])
    assert set(out[0]) == {"boxes", "scores", "labels"}


class Detector(nn.Module):
    """A user's model holding a ResNet trunk, whose forward fx cannot trace (it branches on the data)."""

    def __init__(self):
        super().__init__()
        self.trunk = CaffeResNet(v1=True)
        self.head = nn.Linear(10, 4)

    def forward(self, x):
        y = self.head(self.trunk(x))
        return y if y.sum() > 0 else -y


def test_a_user_model_holding_a_trunk():
    model = randomize_bn(Detector())
    report = inspect(model, (3, 32, 32))
    assert report.trunk == "trunk" and report.variant == "v1" and len(report.blocks) == 6
    assert [d.block for d in report.dead] == ["trunk.res3.0", "trunk.res4.0"]
    exact = convert(model, "v1.5", exact=True, input_size=(3, 32, 32))
    assert type(exact) is Detector and history(exact).recipe.variant_after == Variant.V1_5
    assert [r.block for r in history(exact).recipe.rewrites] == ["trunk.res3.0", "trunk.res4.0"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exact(x), model(x), rtol=1e-5, atol=1e-6)
    pruned = convert(model, prune_dead=True, input_size=(3, 32, 32))
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-5, atol=1e-6)
    replayed = apply_recipe(Detector(), history(pruned).recipe)
    assert isinstance(replayed.trunk, torch.fx.GraphModule)


def test_frozen_batchnorm_checkpoints_load_and_calibration_reestimates_them(tmp_path, monkeypatch):
    # load_model builds the trunk as torchvision builds it for its published weights: FrozenBatchNorm2d.
    model = load_model("fasterrcnn_resnet50_fpn")
    published = torchvision.models.detection.backbone_utils._resnet_fpn_extractor(
        torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d), 3)
    assert set(model.backbone.state_dict()) == set(published.state_dict())
    seg = load_model("fcn_resnet50")
    assert seg.aux_classifier is not None  # as torchvision builds it for its published weights
    # A checkpoint in the TORCH_HOME cache (the enum's file name) loads offline.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, cache / weights.url.rsplit("/", 1)[1])
    with pytest.warns(UserWarning, match="does not match the sha256 prefix"):
        loaded = load_model("fasterrcnn_resnet50_fpn", "COCO_V1")
    assert torch.equal(loaded.backbone.body.layer1[0].bn1.running_mean, state["backbone.body.layer1.0.bn1.running_mean"])

    # BN re-estimation sets a FrozenBatchNorm2d's statistics to those of its input on the data.
    net = torchvision.models.resnet.ResNet(Bottleneck, [1, 1, 1, 1], norm_layer=FrozenBatchNorm2d).eval()
    images = torch.randn(8, 3, 32, 32)
    seen = {}
    handle = net.layer2[0].bn1.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    with torch.no_grad():
        net(images)
    handle.remove()
    var, mean = torch.var_mean(seen["x"], dim=(0, 2, 3), correction=1)
    bn = net.layer2[0].bn1
    assert not torch.allclose(bn.running_mean, mean)
    count = reestimate_bn(net, ["layer2.0.bn1"], DataLoader(TensorDataset(images, torch.zeros(8)), batch_size=8),
                          progress=False)
    assert count == 8
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    # calibrate's bn step matches the original model's normalisation: a norm whose input did not change keeps its
    # statistics, the norms of an approximately rewritten block get new ones.
    loader = DataLoader(TensorDataset(images, torch.zeros(8)), batch_size=8)
    same = copy.deepcopy(net)
    reestimate_bn(same, ["layer3.0.bn2"], loader, reference=net, progress=False)
    torch.testing.assert_close(same.layer3[0].bn2.running_var, net.layer3[0].bn2.running_var)
    v1 = quiet(convert, net, "v1", input_size=(3, 32, 32))
    norms = [n for r in history(v1).recipe.rewrites for n in r.norms]
    before = {n: v1.get_submodule(n).running_mean.clone() for n in norms}
    reestimate_bn(v1, norms, loader, reference=net, progress=False)
    assert not torch.allclose(v1.get_submodule("layer2.0.bn2").running_mean, before["layer2.0.bn2"])


def _images(shared_data, n: int = 2) -> list[torch.Tensor]:
    files = sorted((shared_data / "imagenet-val").glob("*.JPEG"))[:n]
    return [TF.to_tensor(Image.open(f).convert("RGB")) for f in files]


def _small(model):
    """Small images and few proposals: a CPU test; score threshold 0 so random weights detect something."""
    model.transform.min_size, model.transform.max_size = (160,), 224
    model.rpn._pre_nms_top_n["testing"], model.rpn._post_nms_top_n["testing"] = 200, 50
    model.roi_heads.score_thresh, model.roi_heads.detections_per_img = 0.0, 20
    return model


@pytest.mark.slow
def test_exact_rewrites_give_identical_detections_on_real_images(shared_data):
    images = _images(shared_data)
    # The trunk is v1.5; its approximate v1 form, then v1 -> v1.5 exact (dilated): the same function.
    v1 = _small(quiet(convert, load_model("maskrcnn_resnet50_fpn"), "v1", input_size=SIZE))
    exact = convert(v1, "v1.5", exact=True, input_size=SIZE)
    assert history(exact).recipe.exact and not history(v1).recipe.exact
    # float32: every pyramid level of the backbone agrees on the real images.
    batch = v1.transform(images)[0].tensors
    with torch.no_grad():
        a, b = v1.backbone(batch), exact.backbone(batch)
    assert list(a) == ["0", "1", "2", "3", "pool"]
    for level in a:
        assert float((a[level] - b[level]).abs().max() / a[level].abs().max()) <= 1e-5, level
    # Whole detections in float64, where float32 rounding cannot reorder near-tied random-weight scores.
    with torch.no_grad():
        da, db = v1.double()([i.double() for i in images]), exact.double()([i.double() for i in images])
    for x, y in zip(da, db):
        assert len(x["boxes"]) > 0 and set(x) == {"boxes", "labels", "scores", "masks"}
        assert torch.equal(x["labels"], y["labels"])
        for key in ("boxes", "scores", "masks"):
            assert float((x[key] - y[key]).abs().max() / x[key].abs().max()) <= 1e-5, key


@pytest.mark.slow
def test_onnx_segmentation_whole_and_detection_backbone_every_level(tmp_path):
    seg = quiet(convert, load_model("fcn_resnet50"), "d", input_size=(3, 65, 65))
    report = export_onnx(seg, tmp_path / "seg.onnx", input_size=(3, 65, 65), dynamic_batch=False)
    # "out" and "aux" (the auxiliary classifier that torchvision's published weights include), each within 1e-5.
    assert report.passed and len(report.checks[0].output_rel_diffs) == 2 and report.max_rel_diff <= 1e-5
    det = quiet(convert, load_model("fasterrcnn_resnet50_fpn"), "d", input_size=(3, 65, 65))
    save(det, tmp_path / "det")
    runner = CliRunner()
    whole = runner.invoke(main, ["export", str(tmp_path / "det"), "--out", str(tmp_path / "x.onnx")])
    assert whole.exit_code == 2 and "export its trunk with --part backbone" in whole.output
    result = runner.invoke(main, ["export", str(tmp_path / "det"), "--part", "backbone", "--input-size", "65",
                                  "--static-batch", "--json", "--out", str(tmp_path / "det.onnx")])
    assert result.exit_code == 0, result.output
    parity = json.loads(result.output[result.output.index("{"):])
    (check,) = parity["checks"]
    assert len(check["output_rel_diffs"]) == 5 and max(check["output_rel_diffs"]) <= 1e-5 and parity["passed"]


def test_cli_inspect_and_convert_a_detection_model(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", "retinanet_resnet50_fpn", "--input-size", "64"])
    assert result.exit_code == 0, result.output
    assert "retinanet_resnet50_fpn (trunk backbone): variant v1.5" in result.output
    result = runner.invoke(main, ["convert", "fcos_resnet50_fpn", "--to", "v1", "--out", str(tmp_path / "v1"),
                                  "--input-size", "64"])
    assert result.exit_code == 0, result.output
    assert "MACs (trunk backbone)" in result.output and "backbone.body.layer3.0" in result.output
    result = runner.invoke(main, ["convert", str(tmp_path / "v1"), "--prune-dead", "--out", str(tmp_path / "p"),
                                  "--input-size", "64"])
    assert result.exit_code == 0, result.output
    assert "backbone.body.layer2.0" in result.output and "max |difference|" in result.output
    assert Path(tmp_path / "p" / "recipe.json").is_file()


class Gate(nn.Module):
    def forward(self, x):
        return x.relu() if x.sum() > 0 else x


def test_an_untraceable_module_among_the_blocks_is_still_an_error():
    model = torchvision.models.resnet18()
    model.layer3[1].relu = Gate()
    # The blocks split over layer1, layer2, layer3.0 and layer4: none is the trunk; the fix is named as before.
    with pytest.raises(TraceError, match=r"module 'layer3.1.relu' \(Gate\).*leaf_modules=\[Gate\].*split over"):
        convert(model, "v1")
    assert len(find_trunk(model, leaf_modules=[Gate]).blocks) == 8
