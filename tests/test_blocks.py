import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from util import CaffeResNet, Untraceable

from resnet_surgery import SurgeryError, TraceError, count_macs, find_blocks, inspect, trace
from resnet_surgery.engine.blocks import model_variant
from resnet_surgery.engine.inspect import read_fraction


def downsampling(model):
    return [b for b in find_blocks(trace(model)) if b.downsamples]


def test_torchvision_resnet50_blocks_and_variant():
    blocks = find_blocks(trace(torchvision.models.resnet50()))
    assert len(blocks) == 16
    down = [b for b in blocks if b.downsamples]
    assert [b.name for b in down] == ["layer2.0", "layer3.0", "layer4.0"]
    assert all(b.kind == "bottleneck" and b.layout == "v1.5" and b.shortcut_type == "conv1x1" for b in down)
    assert down[0].main_convs == ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.conv3"]
    assert down[0].shortcut_convs == ["layer2.0.downsample.0"]
    assert blocks[1].shortcut_type == "identity"
    assert model_variant(blocks) == "v1.5"


def test_custom_names_found_like_torchvision():
    down = downsampling(CaffeResNet(v1=True))
    assert [b.name for b in down] == ["res3.0", "res4.0"]
    assert down[0].main_convs == ["res3.0.branch2a", "res3.0.branch2b", "res3.0.branch2c"]
    assert down[0].shortcut_convs == ["res3.0.branch1.0"]
    assert all(b.layout == "v1" for b in down)
    assert model_variant(find_blocks(trace(CaffeResNet(v1=False)))) == "v1.5"


def test_basicblock_and_timm_models():
    r18 = downsampling(torchvision.models.resnet18())
    assert all(b.kind == "basic" and b.layout == "n/a" for b in r18)
    t = find_blocks(trace(timm.create_model("resnet26d")))
    assert model_variant(t) == "d"
    assert all(b.shortcut_type == "avgpool" for b in t if b.downsamples)
    # SE gates (a second, multiplicative branch) must not hide the block.
    se = find_blocks(trace(timm.create_model("seresnext26d_32x4d")))
    assert len(se) == 8 and model_variant(se) == "d"


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "vgg11"])
def test_models_without_residual_blocks_are_refused(name):
    with pytest.raises(SurgeryError, match="no residual blocks"):
        find_blocks(trace(torchvision.models.get_model(name)))


def test_untraceable_module_is_named_with_the_leaf_fix():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), Untraceable())
    with pytest.raises(TraceError, match=r"module '1' \(Untraceable\).*leaf_modules=\[Untraceable\]"):
        trace(model)
    gm = trace(model, leaf_modules=[Untraceable])
    assert any(n.op == "call_module" and n.target == "1" for n in gm.graph.nodes)


def test_read_fraction():
    assert read_fraction(56, 1, 2, 0, 1) == 0.5  # per axis: a 1x1 stride-2 conv reads 25% of the plane
    assert read_fraction(56, 3, 2, 1, 1) == 1.0
    assert read_fraction(57, 1, 2, 0, 1) == 29 / 57


def test_inspect_report_resnet50():
    report = inspect(torchvision.models.resnet50())
    assert report.variant == "v1.5"
    assert report.macs == 4_089_184_256  # torchvision's documented 4.09 "GFLOPS"
    strided = {c.name: c.reads for c in report.strided_convs}
    assert strided["layer2.0.downsample.0"] == pytest.approx(0.25)
    assert strided["layer2.0.conv2"] == 1.0
    assert report.dead == [] and "no computation is dead" in report.notes[0]
    d = report.to_dict()
    assert d["variant"] == "v1.5" and len(d["blocks"]) == 16
    assert "layer2.0" in str(report)


def test_inspect_leaves_training_mode_alone():
    model = CaffeResNet().train()
    inspect(model, (3, 32, 32))
    assert model.training
    assert all(m.training for m in model.modules())
    assert torch.equal(model.res2[0].branch2a_bn.running_mean, torch.zeros(8))


def test_measuring_never_changes_a_model_in_training_mode():
    model = torchvision.models.resnet18().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    macs = count_macs(model, (3, 64, 64))
    report = inspect(model, (3, 64, 64))
    assert macs == report.macs > 0
    assert all(m.training for m in model.modules())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == [], "counting MACs must not update BatchNorm statistics (num_batches_tracked, running_mean)"


class FunctionalConvs(nn.Module):
    """Convolutions and a matrix product written as functions, not modules."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.fc = nn.Parameter(torch.randn(10, 8))

    def forward(self, x):
        y = F.conv2d(x, self.w, stride=2, padding=1)  # 8 x 8 x 8 outputs, 27 MACs each
        return y.mean((2, 3)) @ self.fc.t()  # 8 x 10


def test_count_macs_counts_functional_convolutions_and_matmuls():
    assert count_macs(FunctionalConvs(), (3, 16, 16)) == 8 * 8 * 8 * 27 + 8 * 10
