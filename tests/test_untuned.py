"""A custom ResNet nobody tuned the tool for: v1 strides, Caffe-style names, functional activations and
additions, and global pooling written in the ways people write it (issue 20)."""

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from resnet_surgery import SurgeryError, calibrate, convert, history
from resnet_surgery.engine.blocks import find_blocks, pool_module, trace
from resnet_surgery.engine.pooling import find_global_pool
from resnet_surgery.engine.prune import prune_dead_compute
from resnet_surgery.recovery.finetune import finetune

SIZE = 16  # input images are SIZE x SIZE: the last map is 4 x 4


class Unit(nn.Module):
    """A bottleneck with its stride on the first 1x1 (v1) and Caffe-style names."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int, add: str, act: str = "relu"):
        super().__init__()
        self.add, self.act = add, act
        self.res_branch2a = nn.Conv2d(cin, mid, 1, stride, bias=False)
        self.bn_branch2a = nn.BatchNorm2d(mid)
        self.res_branch2b = nn.Conv2d(mid, mid, 3, 1, 1, bias=False)
        self.bn_branch2b = nn.BatchNorm2d(mid)
        self.res_branch2c = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn_branch2c = nn.BatchNorm2d(cout)
        self.project = stride > 1 or cin != cout
        self.res_branch1 = nn.Conv2d(cin, cout, 1, stride, bias=False) if self.project else None
        self.bn_branch1 = nn.BatchNorm2d(cout) if self.project else None

    def forward(self, x):
        y = F.relu(self.bn_branch2a(self.res_branch2a(x)))
        y = F.relu(self.bn_branch2b(self.res_branch2b(y)))
        y = self.bn_branch2c(self.res_branch2c(y))
        s = self.bn_branch1(self.res_branch1(x)) if self.project else x
        if self.add == "torch.add":
            return F.relu(torch.add(y, s))
        y += s  # operator.iadd
        return y.relu() if self.act == "relu" else y.clamp_min(0)


class CaffeNet(nn.Module):
    """Stem, three units (the last two downsample), a global pool of the kind ``pool`` names, a classifier."""

    def __init__(self, pool: str, add: str = "torch.add", act: str = "relu"):
        super().__init__()
        self.pool = pool
        self.conv_stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn_stem = nn.BatchNorm2d(8)
        self.res2a = Unit(8, 4, 16, 1, add, act)
        self.res3a = Unit(16, 8, 32, 2, add, act)
        self.res4a = Unit(32, 8, 32, 2, add, act)
        self.fc10 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn_stem(self.conv_stem(x)))
        x = self.res4a(self.res3a(self.res2a(x)))
        if self.pool == "mean":
            x = x.mean((2, 3))
        elif self.pool == "adaptive":
            x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        elif self.pool == "shape-kernel":
            x = F.avg_pool2d(x, x.shape[-1]).flatten(1)
        elif self.pool == "fixed-kernel":
            x = torch.flatten(F.avg_pool2d(x, SIZE // 4), 1)
        elif self.pool == "keepdim":
            x = torch.mean(x, dim=[-2, -1], keepdim=True).flatten(1)
        return self.fc10(x)


def untuned_pair(pool: str, add: str = "torch.add"):
    """The custom v1 teacher (BatchNorm statistics from a few batches) and its approximate v1.5 conversion."""
    torch.manual_seed(0)
    teacher = CaffeNet(pool, add)
    for m in teacher.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    teacher.train()
    with torch.no_grad():
        for _ in range(3):
            teacher(torch.randn(16, 3, SIZE, SIZE))
    teacher.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = convert(teacher, "v1.5", input_size=(3, SIZE, SIZE))
    return teacher, student


def pre_pool_mse(student: nn.Module, teacher: nn.Module, images: torch.Tensor) -> float:
    """The feature error, the pre-pool maps taken with a forward hook on the last unit (not the code under test)."""
    maps = {}
    hooks = [m.res4a.register_forward_hook(lambda _, __, out, key=key: maps.__setitem__(key, out))
             for key, m in (("s", student), ("t", teacher))]
    with torch.no_grad():
        student.eval()(images), teacher.eval()(images)
    for h in hooks:
        h.remove()
    return float(((maps["s"] - maps["t"]) ** 2).mean())


@pytest.mark.parametrize("pool, add, form", [
    ("mean", "torch.add", r"\.mean\(\(2, 3\)\)"),
    ("adaptive", "iadd", r"adaptive_avg_pool2d\(.*, 1\)"),
    ("shape-kernel", "torch.add", r"avg_pool2d\(.*, getitem\)"),
])
def test_features_objective_finds_the_pool_and_lowers_the_feature_error(pool, add, form):
    teacher, student = untuned_pair(pool, add)
    images = torch.randn(64, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    before = pre_pool_mse(student, teacher, images)
    out = finetune(student, teacher, TensorDataset(images), objective="features", steps=16, batch_size=16, lr=3e-3,
                   progress=False)
    report = history(out).finetune
    assert report.features is not None
    assert report.features.startswith("input of ") and " at node " in report.features
    assert re.search(form, report.features), report.features
    assert "features: input of" in str(report)
    assert pre_pool_mse(out, teacher, images) < 0.8 * before
    # The classifier after the pool is frozen; the student's own forward is back (no tap left behind).
    assert torch.equal(out.fc10.weight, student.fc10.weight)
    assert "forward" not in out.__dict__ and "forward" not in teacher.__dict__


def test_every_pooling_form_is_found_at_the_last_units_output():
    example = torch.randn(2, 3, SIZE, SIZE)
    for pool in ("mean", "adaptive", "shape-kernel", "fixed-kernel", "keepdim"):
        teacher, _ = untuned_pair(pool)
        found = find_global_pool(teacher, example)
        last_relu = [n.name for n in torch.fx.symbolic_trace(teacher).graph.nodes if n.name.startswith("relu")][-1]
        assert found.feature == last_relu, (pool, found)
        assert found.after == ("fc10",) and found.trunk == ""
    # A fixed kernel is global only at the size that makes the map 1x1: shapes decide, so without them it is refused.
    with pytest.raises(SurgeryError, match=r"^no global pooling over the spatial axes found in CaffeNet \(looked for "):
        find_global_pool(untuned_pair("fixed-kernel")[0])


def test_a_global_pool_inside_a_trunk_and_a_module_pool_are_found():
    teacher, _ = untuned_pair("adaptive")

    class Untraceable(nn.Module):  # data-dependent control flow: fx traces only the trunk inside
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, x):
            return self.body(x) if x.sum() > -1e30 else -self.body(x)

    model = Untraceable(teacher)
    found = find_global_pool(model)
    assert found.trunk == "body" and found.after == ("body.fc10",) and "in trunk body" in str(found)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert(model, "v1.5", input_size=(3, SIZE, SIZE))
    images = torch.randn(32, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    out = finetune(converted, model, TensorDataset(images), objective="features", steps=2, batch_size=16,
                   progress=False)
    assert history(out).finetune.features.endswith("in trunk body")
    assert "forward" not in out.body.__dict__ and "forward" not in model.body.__dict__
    tv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    found = find_global_pool(tv)
    assert found.node == "_2" and found.feature == "_1" and found.after == ("4",)


def test_timm_pools_are_found_traced_through_or_as_a_leaf():
    timm = pytest.importorskip("timm")
    from timm.layers import SelectAdaptivePool2d

    # Squeeze-and-excitation pools globally inside every block: the last reduction is the head's.
    se = timm.create_model("seresnext26d_32x4d", num_classes=10)
    assert find_global_pool(se).feature == "layer4_1_act3"
    fast = find_global_pool(timm.create_model("resnet18", num_classes=10, global_pool="fast"))
    assert fast.form == "layer4_1_act2.mean((2, 3), keepdim=False)" and fast.after == ("fc",)
    leaf = find_global_pool(timm.create_model("resnet18", num_classes=10), leaf_modules=[SelectAdaptivePool2d])
    assert leaf.node == "global_pool" and "[SelectAdaptivePool2d]" in leaf.form and leaf.feature == "layer4_1_act2"


class FunctionalD(nn.Module):
    """A ResNet-D-like net written with functions: F.max_pool2d stem, F.avg_pool2d on the shortcut."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.a = nn.Conv2d(8, 8, 1)
        self.b = nn.Conv2d(8, 8, 3, 2, 1)
        self.c = nn.Conv2d(8, 16, 1)
        self.proj = nn.Conv2d(8, 16, 1)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2, 1)
        y = self.c(F.relu(self.b(F.relu(self.a(x)))))
        s = self.proj(F.avg_pool2d(x, 2, ceil_mode=True, count_include_pad=False))
        return F.relu(y + s).mean((2, 3))


def test_functional_pools_count_their_stride_and_equal_their_modules():
    model = FunctionalD()
    gm = trace(model)
    (block,) = find_blocks(gm)
    # The stride is the 3x3's; the functional shortcut pool is seen (not mistaken for a plain 1x1 projection).
    assert block.stride == 2 and str(block.shortcut_type) == "other"
    x = torch.randn(2, 8, 7, 7)
    pools = [n for n in gm.graph.nodes if pool_module(n) is not None]
    assert [type(pool_module(n)).__name__ for n in pools] == ["MaxPool2d", "AvgPool2d"]
    assert torch.equal(pool_module(pools[0])(x), F.max_pool2d(x, 3, 2, 1))
    assert torch.equal(pool_module(pools[1])(x), F.avg_pool2d(x, 2, ceil_mode=True, count_include_pad=False))
    shape_kernel = [n for n in trace(CaffeNet("shape-kernel")).graph.nodes if n.name == "avg_pool2d"]
    assert pool_module(shape_kernel[0]) is None  # a kernel from the input's shape has no fixed stride


def test_prune_dead_pushes_through_functional_and_method_activations():
    torch.manual_seed(0)
    model = CaffeNet("mean", add="iadd", act="clamp").eval()
    pruned, records, _ = prune_dead_compute(copy.deepcopy(model))
    assert any(r.absorbed for r in records), records  # through y += s and y.clamp_min(0)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(pruned(x), model(x), atol=1e-5)


class FlatNet(nn.Module):
    """Caffe-style and flat: the blocks' layers sit on the model itself, no module per block."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1)
        self.res2a_branch2a, self.res2a_branch2b = nn.Conv2d(8, 4, 1, 2), nn.Conv2d(4, 4, 3, 1, 1)
        self.res2a_branch2c, self.res2a_branch1 = nn.Conv2d(4, 16, 1), nn.Conv2d(8, 16, 1, 2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        y = self.res2a_branch2c(F.relu(self.res2a_branch2b(F.relu(self.res2a_branch2a(x)))))
        return self.fc(F.relu(y + self.res2a_branch1(x)).mean((2, 3)))


def test_reconstruction_says_up_front_that_it_needs_block_modules():
    torch.manual_seed(0)
    teacher = FlatNet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = convert(teacher, "v1.5", input_size=(3, SIZE, SIZE))
    data = TensorDataset(torch.randn(8, 3, SIZE, SIZE))
    with pytest.raises(SurgeryError, match=r"^block reconstruction needs each residual block to be one module; "
                                           r"block add is not .*steps=\('bn', 'transfer'\)$"):
        calibrate(student, teacher, data, steps=("reconstruct",), progress=False)
    out = finetune(student, teacher, data, objective="features", steps=2, batch_size=4, progress=False)
    assert history(out).finetune.features == "input of relu_3.mean((2, 3)) at node mean"


class DeepCaffeNet(nn.Module):
    """The committed CIFAR-10 models' shape (stem 16, stages 16/32/64/128 x 1/2/2/2 bottlenecks, v1 strides),
    written our way: Caffe-style names (res3b, res_branch2a), functional ReLU, torch.add, F.adaptive_avg_pool2d."""

    def __init__(self):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn_stem = nn.BatchNorm2d(16)
        self.units, cin = [], 16
        for stage, (planes, count) in enumerate(zip((16, 32, 64, 128), (1, 2, 2, 2))):
            for i in range(count):
                name = f"res{stage + 2}{'abc'[i]}"
                setattr(self, name, Unit(cin, planes, 4 * planes, 2 if stage and not i else 1, "torch.add"))
                self.units.append(name)
                cin = 4 * planes
        self.fc10 = nn.Linear(cin, 10)

    def forward(self, x):
        x = F.relu(self.bn_stem(self.conv_stem(x)))
        for name in self.units:
            x = getattr(self, name)(x)
        return self.fc10(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_a_trained_custom_resnet_quantizes_with_the_defaults(shared_data, tmp_path):
    from resnet_surgery import export_onnx, quantize_onnx, transplant
    from resnet_surgery.data import cifar10_tensors, normalize_uint8
    from resnet_surgery.zoo.cifar import load_cifar_resnet

    # Trained weights moved into our own class (the zoo gives the weights, not the model).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transplant(load_cifar_resnet("v1"), DeepCaffeNet(), input_size=(3, 32, 32)).eval()
    images, labels = cifar10_tensors(shared_data, "test")
    keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:1500]
    data = TensorDataset(normalize_uint8(images[keep]), labels[keep])
    export_onnx(model, tmp_path / "caffe.onnx", input_size=(3, 32, 32))
    report = quantize_onnx(tmp_path / "caffe.onnx", tmp_path / "caffe.int8.onnx", data, num_images=256,
                           parity_images=1000, progress=False)  # the defaults: min_agreement 98, 7-bit weights
    assert report.passed and report.reduce_range and report.agreement >= 98, report
    assert report.top1_fp32 > 80 and abs(report.top1_int8 - report.top1_fp32) <= 1.0, report
