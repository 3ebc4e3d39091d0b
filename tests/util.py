"""Models and helpers shared by the tests."""

import torch
import torch.nn.functional as F
from torch import nn


def write_random_images(folder, n: int, size: int, seed: int = 0):
    """``n`` random ``size`` x ``size`` RGB PNGs named 0.png, 1.png, ... in ``folder`` (created)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()).save(
            folder / f"{i}.png")
    return folder


def randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random BatchNorm statistics and affine parameters, so a rewrite cannot hide behind identity BNs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def relative_error(a: nn.Module, b: nn.Module, size: int, batch: int = 2) -> float:
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    return float((ya - yb).abs().max() / ya.abs().max())


class Unit(nn.Module):
    """A bottleneck written the Caffe way: branch2a/2b/2c, branch1, functional relu, ``y + s``."""

    def __init__(self, cin: int, width: int, cout: int, stride: int, stride_on_1x1: bool):
        super().__init__()
        s1, s3 = (stride, 1) if stride_on_1x1 else (1, stride)
        self.branch2a = nn.Conv2d(cin, width, 1, stride=s1, bias=False)
        self.branch2a_bn = nn.BatchNorm2d(width)
        self.branch2b = nn.Conv2d(width, width, 3, stride=s3, padding=1, bias=False)
        self.branch2b_bn = nn.BatchNorm2d(width)
        self.branch2c = nn.Conv2d(width, cout, 1, bias=False)
        self.branch2c_bn = nn.BatchNorm2d(cout)
        self.branch1 = None
        if stride != 1 or cin != cout:
            self.branch1 = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.branch2a_bn(self.branch2a(x)))
        y = F.relu(self.branch2b_bn(self.branch2b(y)))
        y = self.branch2c_bn(self.branch2c(y))
        s = x if self.branch1 is None else self.branch1(x)
        return F.relu(y + s)


class CaffeResNet(nn.Module):
    """A small ResNet with none of torchvision's names: stem, res2..res4, classifier."""

    def __init__(self, v1: bool = True, units=(2, 2, 2), widths=(8, 16, 32), num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        stages, cin = [], 16
        for i, (n, w) in enumerate(zip(units, widths)):
            stage = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(Unit(cin, w, 4 * w, stride, stride_on_1x1=v1))
                cin = 4 * w
            stages.append(nn.Sequential(*stage))
        self.res2, self.res3, self.res4 = stages
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.res4(self.res3(self.res2(self.stem(x))))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Untraceable(nn.Module):
    """A block whose forward branches on data: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return x


def run(*args):
    """``resnet-surgery ARGS`` through click's runner (arguments may be paths or numbers)."""
    from click.testing import CliRunner

    from resnet_surgery.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, *needles):
    """Exit 2, one 'error: ...' line that holds every needle and ends stderr (after any progress bar), no traceback."""
    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and result.stderr.count("error: ") == 1, result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in line, line
    return line
