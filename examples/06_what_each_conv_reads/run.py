"""What each downsampling conv of a ResNet-50 reads, as v1, v1.5, d and pruned v1: text, and a figure."""

import os
import sys
import warnings
from pathlib import Path

import torchvision

import resnet_surgery as rs

warnings.simplefilter("ignore", rs.SurgeryNotice)  # v1 and d are approximate conversions: the figure is about structure
out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "docs" / "sites-resnet50.png"
model = torchvision.models.resnet50().eval()  # random weights: only the structure matters here
v1 = rs.convert(model, "v1")
variants = {"v1": v1, "v1.5 (torchvision)": model, "d": rs.convert(model, "d"),
            "pruned v1": rs.convert(v1, prune_dead=True)}

for label, m in variants.items():
    print(f"== {label}")
    print(rs.inspect(m).grid(m))

report = rs.inspect(v1)
report.plot(out, v1, compare=list(variants.values())[1:], labels=list(variants))
print(f"wrote {os.path.relpath(out)}")
