import json
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn
from torchvision.models import ResNet, resnet18, resnet34, resnet50
from torchvision.models.resnet import Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d
from util import randomize_bn, relative_error

import resnet_surgery as rs
from resnet_surgery import SurgeryError, SurgeryNotice, history, transplant
from resnet_surgery.cli import main

SIZE = (3, 64, 64)


class CaffeUnit(nn.Module):
    """A bottleneck written the Caffe/MSRA way: stride on the first 1x1 (v1), branch1 as two attributes,
    functional relu and torch.add."""

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.branch2a = nn.Conv2d(cin, width, 1, stride=stride, bias=False)
        self.bn2a = nn.BatchNorm2d(width)
        self.branch2b = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2b = nn.BatchNorm2d(width)
        self.branch2c = nn.Conv2d(width, 4 * width, 1, bias=False)
        self.bn2c = nn.BatchNorm2d(4 * width)
        self.projection = stride != 1 or cin != 4 * width
        if self.projection:
            self.branch1 = nn.Conv2d(cin, 4 * width, 1, stride=stride, bias=False)
            self.bn1 = nn.BatchNorm2d(4 * width)

    def forward(self, x):
        y = F.relu(self.bn2a(self.branch2a(x)))
        y = F.relu(self.bn2b(self.branch2b(y)))
        y = self.bn2c(self.branch2c(y))
        s = self.bn1(self.branch1(x)) if self.projection else x
        return F.relu(torch.add(y, s))


class CaffeNet(nn.Module):
    """torchvision's ResNet(Bottleneck, units) with none of its names, its modules or its stride placement."""

    def __init__(self, units=(2, 1, 1, 1), num_classes: int = 10, stem_bias: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=stem_bias)
        self.bn_conv1 = nn.BatchNorm2d(64)
        stages, cin = [], 64
        for i, n in enumerate(units):
            width = 64 * 2**i
            stages.append(nn.ModuleList([CaffeUnit(cin if j == 0 else 4 * width, width, 2 if i and j == 0 else 1)
                                         for j in range(n)]))
            cin = 4 * width
        self.res = nn.ModuleList(stages)
        self.fc1000 = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn_conv1(self.conv1(x))), 3, 2, 1)
        for stage in self.res:
            for unit in stage:
                x = unit(x)
        return self.fc1000(x.mean((2, 3)))


def small_torchvision(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [2, 1, 1, 1], num_classes=10, **kwargs)


def quiet(fn, *args, **kwargs):
    """Call ``fn`` and return (result, the SurgeryNotices it gave)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in caught if issubclass(w.category, SurgeryNotice)]


def assert_untouched(target: nn.Module, before: dict) -> None:
    after = target.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("direction", ["torchvision->timm", "timm->torchvision"])
def test_torchvision_and_timm_resnet50(direction):
    tv, tm = randomize_bn(resnet50(), 1), randomize_bn(timm.create_model("resnet50"), 2)
    source, target = (tv, tm) if direction == "torchvision->timm" else (tm, tv)
    before = target.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    moved, notices = quiet(transplant, source, target, input_size=SIZE)
    assert notices == [], "same layout: nothing to convert, nothing to warn about"
    assert type(moved) is type(target) and list(moved.state_dict()) == list(before)
    assert_untouched(target, before)
    assert relative_error(source, moved, 64) <= 1e-6 and relative_error(source, target, 64) > 0.1
    summary = history(moved).recipe.transplant
    assert summary["tensors"] == len(source.state_dict()) and summary["probe"]["max_abs_diff"] <= 1e-6 * summary["probe"]["max_abs"]
    assert summary["modules"]["layer2.0.downsample.0"] == "layer2.0.downsample.0"
    assert [s["modules"] for s in summary["sections"][:3]] == [2, 8, 6]  # stem conv+bn, projection block, identity block


@pytest.mark.slow
def test_timm_avg_down_and_torchvision_d():
    avg_down = randomize_bn(timm.create_model("resnet50", avg_down=True), 3)
    d, notices = quiet(rs.convert, resnet50(), "d")
    moved, notices = quiet(transplant, avg_down, d, input_size=SIZE)
    assert notices == [] and relative_error(avg_down, moved, 64) <= 1e-6
    # Into plain torchvision: the target becomes a ResNet-D first, and says so.
    moved, notices = quiet(transplant, avg_down, resnet50(), input_size=SIZE)
    assert len(notices) == 1 and "converted to the source's form (avgpool shortcuts)" in notices[0]
    assert "3 blocks (layer2.0, layer3.0, layer4.0)" in notices[0]
    assert [r.op for r in history(moved).recipe.rewrites] == ["shortcut_avgpool"] * 3
    assert isinstance(moved.layer3[0].downsample[0][0], nn.AvgPool2d)
    assert relative_error(avg_down, moved, 64) <= 1e-6
    # And back: into timm's plain resnet50, whose downsample gets the pool.
    back, notices = quiet(transplant, moved, timm.create_model("resnet50"), input_size=SIZE)
    assert len(notices) == 1 and relative_error(avg_down, back, 64) <= 1e-6


def test_caffe_v1_into_torchvision_becomes_v1():
    caffe = randomize_bn(CaffeNet(), 4)
    target = small_torchvision()
    moved, notices = quiet(transplant, caffe, target, input_size=SIZE)
    assert len(notices) == 1 and "(v1)" in notices[0]
    assert moved.layer2[0].conv1.stride == (2, 2) and moved.layer2[0].conv2.stride == (1, 1)
    assert target.layer2[0].conv2.stride == (2, 2), "the target is untouched"
    assert [r.op for r in history(moved).recipe.rewrites] == ["stride_to_1x1"] * 3
    assert history(moved).recipe.transplant["modules"]["layer3.0.downsample.1"] == "res.2.0.bn1"
    assert relative_error(caffe, moved, 64) <= 1e-6


def test_torchvision_into_caffe_becomes_v1_5():
    tv = randomize_bn(small_torchvision(), 5)
    moved, notices = quiet(transplant, tv, CaffeNet(), input_size=SIZE)
    assert len(notices) == 1 and "(v1.5)" in notices[0]
    assert type(moved) is CaffeNet and moved.res[1][0].branch2b.stride == (2, 2)
    assert relative_error(tv, moved, 64) <= 1e-6


def test_dilated_v1_5_source_gives_a_dilated_target():
    dilated, _ = quiet(rs.convert, randomize_bn(CaffeNet(), 6), "v1.5", exact=True, input_size=SIZE)
    moved, notices = quiet(transplant, dilated, small_torchvision(), input_size=SIZE)
    assert "v1.5 (dilated)" in notices[0] and moved.layer2[0].conv2.dilation == (2, 2)
    assert relative_error(dilated, moved, 64) <= 1e-6


def test_pruned_source_prunes_the_target():
    caffe = randomize_bn(CaffeNet(), 12)
    pruned, _ = quiet(rs.convert, caffe, prune_dead=True, input_size=SIZE)
    moved, notices = quiet(transplant, pruned, small_torchvision(), input_size=SIZE)
    assert len(notices) == 1 and "pruned the same way" in notices[0]
    assert [r.op for r in history(moved).recipe.rewrites].count("prune_dead") >= 1
    assert relative_error(pruned, moved, 64) <= 1e-6
    with pytest.raises(SurgeryError, match="the target was pruned .* then convert the result with prune_dead=True"):
        transplant(caffe, pruned, input_size=SIZE)


def test_frozen_batchnorm_target():
    caffe = randomize_bn(CaffeNet(), 7)
    moved, _ = quiet(transplant, caffe, small_torchvision(norm_layer=FrozenBatchNorm2d), input_size=SIZE)
    assert isinstance(moved.layer1[0].bn1, FrozenBatchNorm2d)
    assert torch.equal(moved.layer1[0].bn1.running_var, caffe.res[0][0].bn2a.running_var)
    assert relative_error(caffe, moved, 64) <= 1e-6


def test_mismatches_are_one_line():
    with pytest.raises(SurgeryError, match=r"^source has 8 blocks, target 16: they are not the same network$"):
        transplant(resnet18(), resnet34(), input_size=SIZE)
    narrow = small_torchvision(width_per_group=32)
    with pytest.raises(SurgeryError, match=r"^res\.0\.0\.branch2a \[64, 64, 1, 1\] vs layer1\.0\.conv1 \[32, 64, 1, 1\]$"):
        transplant(CaffeNet(), narrow, input_size=SIZE)
    with pytest.raises(SurgeryError, match=r"^source conv1 has a bias \(Conv2d\), target conv1 has none \(Conv2d\)$"):
        transplant(CaffeNet(stem_bias=True), small_torchvision(), input_size=SIZE)


def test_head_mismatch_and_no_head():
    caffe = randomize_bn(CaffeNet(num_classes=1000), 8)
    target = small_torchvision()
    with pytest.raises(SurgeryError, match=r"^fc1000 \[1000, 2048\] vs fc \[10, 2048\]; pass head=False \(--no-head\)"):
        transplant(caffe, target, input_size=SIZE)
    moved, _ = quiet(transplant, caffe, target, head=False, input_size=SIZE)
    assert torch.equal(moved.fc.weight, target.fc.weight) and torch.equal(moved.conv1.weight, caffe.conv1.weight)
    assert history(moved).recipe.transplant["probe"] is None


def test_save_load_round_trip(tmp_path):
    avg_down = randomize_bn(timm.create_model("resnet50", avg_down=True), 9)
    moved, _ = quiet(transplant, avg_down, rs.load_model("resnet50"), input_size=SIZE)
    again, _ = quiet(rs.load, rs.save(moved, tmp_path / "d"))
    assert type(again) is ResNet and relative_error(avg_down, again, 64) <= 1e-6
    assert rs.read_recipe(tmp_path / "d").transplant["source"]["kind"] == "custom"
    # Without a conversion the recipe replays nothing, and still loads.
    plain, _ = quiet(transplant, randomize_bn(timm.create_model("resnet50"), 10), rs.load_model("resnet50"),
                     input_size=SIZE)
    again, _ = quiet(rs.load, rs.save(plain, tmp_path / "plain"))
    assert relative_error(plain, again, 64) == 0.0


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.slow
def test_cli_transplant(tmp_path):
    weights = tmp_path / "timm.safetensors"
    source = randomize_bn(timm.create_model("resnet50"), 11)
    save_file(source.state_dict(), str(weights))
    out = tmp_path / "tv"
    result = run("transplant", "timm:resnet50", "--weights", weights, "--into", "resnet50", "--out", out,
                 "--input-size", 64)
    assert result.exit_code == 0, result.output
    assert "16 blocks" in result.output and "layer4.2" in result.output and "relative 0" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "recipe.json", "summary.txt"]
    assert relative_error(source, rs.load(out), 64) <= 1e-6
    result = run("transplant", "resnet18", "--into", "resnet18", "--no-head", "--json", "--out", tmp_path / "trunk",
                 "--input-size", 64)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)["recipe"]["transplant"]
    assert summary["head"] is False and summary["probe"] is None and "fc" not in summary["modules"]
    bad = tmp_path / "bad"
    result = run("transplant", "resnet18", "--into", "resnet34", "--out", bad)
    assert result.exit_code == 2 and not bad.exists()
    assert result.output == "error: source has 8 blocks, target 16: they are not the same network\n"
