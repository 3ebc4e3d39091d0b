"""Your own ResNet, with none of torchvision's names: blocks are found from the fx graph alone."""

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import resnet_surgery as rs


class Unit(nn.Module):
    def __init__(self, cin, width, cout, stride):
        super().__init__()
        self.branch2a = nn.Conv2d(cin, width, 1, stride=stride, bias=False)  # v1: stride on the 1x1
        self.bn2a = nn.BatchNorm2d(width)
        self.branch2b = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2b = nn.BatchNorm2d(width)
        self.branch2c = nn.Conv2d(width, cout, 1, bias=False)
        self.bn2c = nn.BatchNorm2d(cout)
        self.branch1 = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if stride > 1 or cin != cout else None

    def forward(self, x):
        y = F.relu(self.bn2a(self.branch2a(x)))
        y = F.relu(self.bn2b(self.branch2b(y)))
        y = self.bn2c(self.branch2c(y))
        s = x if self.branch1 is None else self.branch1(x)
        return F.relu(y + s)


class MyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        self.body = nn.Sequential(Unit(64, 16, 64, 1), Unit(64, 16, 64, 1), Unit(64, 32, 128, 2),
                                  Unit(128, 32, 128, 1), Unit(128, 64, 256, 2))
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


warnings.simplefilter("ignore", rs.SurgeryNotice)
model = MyResNet().eval()
report = rs.inspect(model, (3, 32, 32))
print(report)
pruned = rs.convert(model, prune_dead=True)
x = torch.randn(4, 3, 33, 33)
with torch.no_grad():
    print(f"\nprune_dead: max |diff| {(model(x) - pruned(x)).abs().max():.2g}, "
          f"MACs {rs.count_macs(model, (3, 32, 32)) / 1e6:.1f} M -> {rs.count_macs(pruned, (3, 32, 32)) / 1e6:.1f} M")
d = rs.convert(model, "d")
print("to d:", [(r.block, r.op, r.exact) for r in rs.history(d).recipe.rewrites])
