import copy
import dataclasses
import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn
from util import CaffeResNet, Unit, randomize_bn, relative_error

from resnet_surgery import (
    NotExactError,
    SurgeryError,
    SurgeryNotice,
    apply_recipe,
    convert,
    find_blocks,
    history,
    trace,
)

TOL = 1e-5


def quiet_convert(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeryNotice)
        return convert(*args, **kwargs)


def model_zoo():
    return {
        "resnet50": lambda: torchvision.models.resnet50(),
        "resnext50_32x4d": lambda: torchvision.models.resnext50_32x4d(),
        "timm:resnet26": lambda: timm.create_model("resnet26"),
        "custom": lambda: CaffeResNet(v1=False),
    }


@pytest.fixture(scope="module", params=list(model_zoo()))
def v1_pair(request):
    """(name, a v1 model, its exact v1.5 (dilated) form)."""
    base = randomize_bn(model_zoo()[request.param]())
    v1 = quiet_convert(base, "v1")
    return request.param, v1, convert(v1, "v1.5", exact=True)


@pytest.mark.parametrize("size", [33, 57, pytest.param(97, marks=pytest.mark.slow),
                                  pytest.param(224, marks=pytest.mark.slow)])
def test_exact_v1_to_dilated_v15(v1_pair, size):
    name, v1, exact = v1_pair
    assert relative_error(v1, exact, size, batch=1 if size == 224 else 2) <= TOL
    spatial = [exact.get_submodule(b.main_convs[1]) for b in find_blocks(trace(exact)) if b.downsamples]
    assert spatial and all(c.dilation == (2, 2) for c in spatial)


def test_dilated_form_is_what_was_asked():
    v1 = quiet_convert(randomize_bn(torchvision.models.resnet50()), "v1")
    exact = convert(v1, "v1.5", exact=True)
    block = exact.layer3[0]
    assert block.conv1.stride == (1, 1)
    assert (block.conv2.stride, block.conv2.dilation, block.conv2.padding) == ((2, 2), (2, 2), (2, 2))
    assert history(exact).recipe.exact is True
    assert {r.op for r in history(exact).recipe.rewrites} == {"stride_to_3x3_dilated"}
    # The dilated form goes back to plain v1 exactly too.
    back = convert(exact, "v1", exact=True)
    assert relative_error(v1, back, 57) <= TOL


@pytest.mark.parametrize("name", list(model_zoo()))
def test_exact_conv3x3_shortcut(name):
    base = randomize_bn(model_zoo()[name]())
    new = convert(base, shortcut="conv3x3", exact=True)
    for size in (33, 64):
        assert relative_error(base, new, size) <= TOL
    back = convert(new, shortcut="conv1x1", exact=True)  # the off-centre taps are zero: exact again
    assert relative_error(base, back, 33) <= TOL


def test_v1_strides_and_round_trip_into_torchvision_class():
    base = randomize_bn(torchvision.models.resnet50())
    v1 = quiet_convert(base, "v1")
    for layer in (v1.layer2, v1.layer3, v1.layer4):
        assert layer[0].conv1.stride == (2, 2) and layer[0].conv2.stride == (1, 1)
    assert v1.layer1[0].conv1.stride == (1, 1)
    assert type(v1) is type(base)
    back = quiet_convert(v1, "v1.5")
    assert list(back.state_dict()) == list(base.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), base.state_dict().values()))
    assert relative_error(base, back, 57) == 0.0
    fresh = torchvision.models.resnet50()
    fresh.load_state_dict(quiet_convert(v1, "v1.5").state_dict())
    assert relative_error(base, fresh, 33) == 0.0


def test_argument_is_never_modified():
    base = randomize_bn(torchvision.models.resnet50())
    before = copy.deepcopy(base.state_dict())
    quiet_convert(base, "d")
    quiet_convert(base, "v1", prune_dead=True)
    assert base.layer2[0].conv2.stride == (2, 2) and isinstance(base.layer2[0].downsample[0], nn.Conv2d)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize("size", [33, 57, 224])
def test_resnet_d_architecture_and_shapes(size):
    base = randomize_bn(torchvision.models.resnet50())
    d = quiet_convert(base, "d")
    pool, conv = d.layer2[0].downsample[0]
    assert isinstance(pool, nn.AvgPool2d)
    assert (pool.kernel_size, pool.stride, pool.ceil_mode, pool.count_include_pad) == (2, 2, True, False)
    assert conv.stride == (1, 1)
    assert torch.equal(conv.weight, base.layer2[0].downsample[0].weight)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        feats = torchvision.models.feature_extraction.create_feature_extractor
        a = feats(base, {"layer4": "out"})(x)["out"]
        b = feats(d, {"layer4": "out"})(x)["out"]
    assert a.shape == b.shape
    rec = history(d).recipe
    assert rec["variant_after"] == "d" and not rec["exact"]
    sc = [r for r in rec["rewrites"] if r.op == "shortcut_avgpool"][0]
    assert sc["convs"] == {"layer2.0.downsample.0.1": "layer2.0.downsample.0"}
    assert sc["keys"] == {"layer2.0.downsample.0.weight": "layer2.0.downsample.0.1.weight"}
    back = quiet_convert(d, "v1.5")
    assert list(back.state_dict()) == list(base.state_dict())
    assert relative_error(base, back, 33) == 0.0


def test_timm_avg_down_back_to_conv1x1():
    t = randomize_bn(timm.create_model("resnet26d"))
    v15 = quiet_convert(t, "v1.5")
    ds = v15.layer3[0].downsample
    assert isinstance(ds[0], nn.Identity) and ds[1].stride == (2, 2)
    d = quiet_convert(v15, "d")  # the pool goes back into timm's own slot: timm's keys and layout
    assert isinstance(d.layer3[0].downsample[0], nn.AvgPool2d) and d.layer3[0].downsample[1].stride == (1, 1)
    assert list(d.state_dict()) == list(t.state_dict())
    assert relative_error(t, d, 41) == 0.0


def test_exact_requests_that_cannot_be_exact_say_why():
    base = torchvision.models.resnet50()
    with pytest.raises(NotExactError, match="no exact rewrite exists"):
        convert(base, "v1", exact=True)
    with pytest.raises(NotExactError, match="avgpool shortcut averages 4 positions"):
        convert(base, "d", exact=True)


def test_no_op_says_so():
    with pytest.warns(SurgeryNotice, match="already v1.5: nothing to change"):
        same = convert(torchvision.models.resnet50(), "v1.5")
    assert history(same).recipe.rewrites == []


def test_approximate_conversion_says_it_changes_the_function():
    with pytest.warns(SurgeryNotice, match="changes the function"):
        convert(torchvision.models.resnet50(), "v1")


def test_basicblock_stride_move_not_applicable_but_shortcut_swaps_apply():
    r18 = randomize_bn(torchvision.models.resnet18())
    with pytest.warns(SurgeryNotice, match="do not apply to 3 blocks"):
        same = convert(r18, "v1")
    assert history(same).recipe.rewrites == []
    d = quiet_convert(r18, "d")
    assert [r.op for r in history(d).recipe.rewrites] == ["shortcut_avgpool"] * 3
    assert relative_error(r18, convert(r18, shortcut="conv3x3", exact=True), 45) <= TOL


def test_bad_arguments():
    with pytest.raises(SurgeryError, match="unknown variant"):
        convert(torchvision.models.resnet18(), "v2")
    with pytest.raises(SurgeryError, match="nothing to do"):
        convert(torchvision.models.resnet18())


def test_custom_model_converts_and_apply_recipe_reproduces():
    base = randomize_bn(CaffeResNet(v1=False))
    d = quiet_convert(base, "d")
    rewrites = [(r.block, r.op) for r in history(d).recipe.rewrites]
    assert rewrites == [("res3.0", "shortcut_avgpool"), ("res4.0", "shortcut_avgpool")]
    assert d.res3[0].branch2a.stride == (1, 1) and isinstance(d.res3[0].branch1[0][0], nn.AvgPool2d)
    again = apply_recipe(randomize_bn(CaffeResNet(v1=False)), history(d).recipe)
    again.load_state_dict(d.state_dict())
    assert relative_error(d, again, 35) == 0.0
    with pytest.raises(SurgeryError, match="recipe does not fit"):
        apply_recipe(CaffeResNet(v1=False, units=(1, 1, 3)), dataclasses.replace(history(d).recipe, rewrites=[]))


def test_a_conv_shared_by_two_blocks_is_refused_and_the_argument_kept():
    # Two downsampling units that share one projection shortcut: rewriting it would change both.
    first, second = Unit(16, 4, 16, 2, stride_on_1x1=False), Unit(16, 4, 16, 2, stride_on_1x1=False)
    second.branch1 = first.branch1
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), first, second).eval()
    with pytest.raises(SurgeryError, match=r"1\.branch1\.0 is called 2 times in the forward"):
        convert(model, "d", input_size=(3, 16, 16))
    assert isinstance(model[1].branch1[0], nn.Conv2d) and model[1].branch1[0].stride == (2, 2)


def test_a_3x3_shortcut_with_off_centre_taps_has_no_exact_1x1_form():
    wide = convert(randomize_bn(CaffeResNet()), shortcut="conv3x3", exact=True, input_size=(3, 32, 32))
    with torch.no_grad():
        wide.res3[0].branch1[0].weight[:, :, 0, 0] += 0.1  # trained 3x3 shortcuts use their whole kernel
    with pytest.raises(NotExactError, match="res3.0: the 3x3 shortcut has non-zero off-centre taps"):
        convert(wide, shortcut="conv1x1", exact=True, input_size=(3, 32, 32))
    # res4.0 still holds only its centre tap: without exact=True both convert, res3.0 marked approximate.
    narrow = quiet_convert(wide, shortcut="conv1x1", input_size=(3, 32, 32))
    assert [(r.block, r.exact) for r in history(narrow).recipe.rewrites] == [("res3.0", False), ("res4.0", True)]


class StrideOnLast(nn.Module):
    """A bottleneck whose stride sits on the last 1x1: neither v1 nor v1.5."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 4, 3, padding=1)
        self.c, self.proj = nn.Conv2d(4, 8, 1, stride=2), nn.Conv2d(8, 8, 1, stride=2)

    def forward(self, x):
        return torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x))))) + self.proj(x))


def test_unrecognised_stride_placement_is_a_notice_and_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), StrideOnLast())
    with pytest.warns(SurgeryNotice, match=r"1: stride placement not recognised \(main convs \['1.a', '1.b', '1.c'\]\)"):
        out = convert(model, "v1", input_size=(3, 16, 16))
    assert history(out).recipe.rewrites == []
    assert [out[1].a.stride, out[1].b.stride, out[1].c.stride] == [(1, 1), (1, 1), (2, 2)]
