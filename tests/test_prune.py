import warnings

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor
from util import CaffeResNet, randomize_bn, relative_error

from resnet_surgery import Subsample, SurgeryNotice, convert, count_macs, history, inspect

TOL = 1e-5


def v1_model(name):
    build = {"resnet50": torchvision.models.resnet50, "resnet101": torchvision.models.resnet101,
             "resnext50_32x4d": torchvision.models.resnext50_32x4d, "custom": lambda: CaffeResNet(v1=False)}[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeryNotice)
        return convert(randomize_bn(build()), "v1")


@pytest.fixture(scope="module", params=["resnet50", "custom", pytest.param("resnet101", marks=pytest.mark.slow),
                                        pytest.param("resnext50_32x4d", marks=pytest.mark.slow)])
def pruned_pair(request):
    v1 = v1_model(request.param)
    return v1, convert(v1, prune_dead=True)


@pytest.mark.parametrize("size", [33, 56, 57])
def test_pruned_equals_v1(pruned_pair, size):
    v1, pruned = pruned_pair
    assert relative_error(v1, pruned, size) <= TOL
    assert all(r.exact for r in history(pruned).recipe.rewrites)


@pytest.mark.slow
def test_pruned_resnet50_at_224_and_macs():
    v1 = v1_model("resnet50")
    pruned = convert(v1, prune_dead=True)
    assert relative_error(v1, pruned, 224, batch=1) <= TOL
    before, after = count_macs(v1), count_macs(pruned)
    assert before == pytest.approx(3.858e9, rel=1e-3) and after == pytest.approx(3.482e9, rel=1e-3)
    assert inspect(v1).dead_macs == before - after


def test_what_the_pass_did_on_resnet50():
    pruned = convert(v1_model("resnet50"), prune_dead=True)
    records = history(pruned).recipe.rewrites
    assert [r.block for r in records] == ["layer2.0", "layer3.0", "layer4.0"]
    # The previous block's 3x3 takes the stride; the readers lose theirs; the identity becomes a subsample.
    assert records[0]["absorbed"] == ["layer1.2.conv2"]
    assert records[0]["readers"] == ["layer2.0.conv1", "layer2.0.downsample.0"]
    assert pruned.get_submodule("layer1.2.conv2").stride == (2, 2)
    assert pruned.get_submodule("layer2.0.conv1").stride == (1, 1)
    assert sum(isinstance(m, Subsample) for m in pruned.modules()) == 3
    assert list(pruned.state_dict()) == list(v1_model("resnet50").state_dict())


def test_refuses_where_the_feature_map_is_tapped():
    v1 = v1_model("resnet50")
    taps = create_feature_extractor(v1, {"layer1": "c2", "layer3": "c4"})
    with pytest.warns(SurgeryNotice, match=r"layer2.0: its input .* is also read at full resolution"):
        pruned = convert(taps, prune_dead=True)
    # The extractor ends at layer3: layer3.0 is pruned, layer2.0 (whose input c2 taps) is not.
    assert [r.block for r in history(pruned).recipe.rewrites] == ["layer3.0"]
    x = torch.randn(1, 3, 57, 57)
    with torch.no_grad():
        a, b = taps(x), pruned(x)
    assert a["c2"].shape == b["c2"].shape == (1, 256, 15, 15)
    assert all(torch.allclose(a[k], b[k], atol=1e-5 * a[k].abs().max()) for k in a)


def test_nothing_dead_in_v15_or_d():
    with pytest.warns(SurgeryNotice, match="no computation is dead"):
        pruned = convert(randomize_bn(CaffeResNet(v1=False)), prune_dead=True)
    assert history(pruned).recipe.rewrites == []
    assert inspect(CaffeResNet(v1=False), (3, 32, 32)).dead == []


def test_composes_with_variant_conversion():
    base = randomize_bn(CaffeResNet(v1=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeryNotice)
        v1 = convert(base, "v1")
        both = convert(base, "v1", prune_dead=True)
    ops = [r.op for r in history(both).recipe.rewrites]
    assert ops == ["stride_to_1x1", "stride_to_1x1", "prune_dead", "prune_dead"]
    assert relative_error(v1, both, 37) <= TOL
