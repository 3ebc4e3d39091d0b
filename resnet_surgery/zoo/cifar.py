"""Small torchvision-layout Bottleneck ResNets with a CIFAR stem, trained on CIFAR-10 as v1 and v1.5.

The layout is torchvision's (conv1, bn1, relu, layer1..layer3, avgpool, fc; blocks are
``torchvision.models.resnet.Bottleneck``), so every tool that handles a torchvision ResNet handles these.
The only differences are the CIFAR stem (3x3 conv, stride 1, no max-pool) and three stages.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from ..arguments import checked_arguments
from ..errors import SurgeryError
from ..vocab import Variant

__all__ = [
    "CIFAR_MODELS", "CifarResNet", "DEFAULT_BLOCKS", "DEFAULT_STEM_WIDTH", "DEFAULT_WIDTHS", "LAYOUTS",
    "WEIGHTS_DIR", "cifar_resnet", "load_cifar_resnet", "weights_path",
]

LAYOUTS = (Variant.V1.value, Variant.V1_5.value)
# Registered model names -> layout of the committed CIFAR-10 weights.
CIFAR_MODELS = {"cifar10-resnet-v1": Variant.V1.value, "cifar10-resnet-v1.5": Variant.V1_5.value}
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# The committed models: four stages (three downsampling blocks); extra blocks where the maps are small (cheap).
DEFAULT_WIDTHS = (16, 32, 64, 128)
DEFAULT_BLOCKS = (1, 2, 2, 2)
DEFAULT_STEM_WIDTH = 16
STEMS = ("cifar", "imagenet")


class CifarResNet(nn.Module):
    """torchvision's ResNet with a 3x3 stride-1 stem and no max-pool, for 32x32 inputs."""

    def __init__(self, widths: Sequence[int], blocks: Sequence[int], num_classes: int, stem_width: int,
                 stem: str = "cifar"):
        super().__init__()
        self.inplanes = stem_width
        self.stem = stem
        if stem == "imagenet":  # torchvision's stem: 7x7 stride 2, then a 3x3 stride-2 max-pool
            self.conv1 = nn.Conv2d(3, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        if stem == "imagenet":
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for i, (planes, n) in enumerate(zip(widths, blocks)):
            setattr(self, f"layer{i + 1}", self._make_layer(planes, n, stride=1 if i == 0 else 2))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BN of each block so every residual branch starts as identity (torchvision's option).
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        # Same as torchvision.models.resnet.ResNet._make_layer.
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        if self.stem == "imagenet":
            x = self.maxpool(x)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _to_v1(model: nn.Module) -> None:
    """Move the stride of every downsampling block from the 3x3 (v1.5) to the first 1x1 conv (v1)."""
    for m in model.modules():
        if isinstance(m, Bottleneck) and m.conv2.stride != (1, 1):
            m.conv1.stride, m.conv2.stride = m.conv2.stride, (1, 1)
            m.stride = m.conv1.stride[0]


MAX_WIDTH = 4096  # a stage's bottleneck width (ResNet-50's widest is 512), block count or class count


@checked_arguments
def cifar_resnet(
    layout: str = "v1.5",
    *,
    widths: Sequence[int] = DEFAULT_WIDTHS,
    blocks: Sequence[int] = DEFAULT_BLOCKS,
    num_classes: int = 10,
    stem_width: int = DEFAULT_STEM_WIDTH,
    stem: str = "cifar",
) -> nn.Module:
    """A Bottleneck ResNet; ``layout`` "v1.5" strides the 3x3, "v1" the first 1x1.

    Args:
        layout: "v1.5" or "v1".
        widths: each stage's bottleneck width (its output is 4x that).
        blocks: each stage's number of blocks.
        num_classes: outputs of the classifier.
        stem_width: channels of the stem conv.
        stem: "cifar" (3x3 stride 1, no max-pool: for 32x32 images) or "imagenet" (torchvision's 7x7 stride 2
            and max-pool: the ResNet-50 stand-in, fed upsampled images).

    Returns:
        Module: the model with random weights.

    Raises:
        SurgeryError: an unknown ``layout`` or ``stem``, ``widths`` and ``blocks`` of different lengths or
            with fewer than 3 stages, or a size below 1 or above 4096.
        TypeError: an argument of the wrong type (``widths`` or ``blocks`` not a sequence of int).
    """
    if layout not in LAYOUTS:
        raise SurgeryError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if len(widths) != len(blocks) or len(widths) < 3:
        raise SurgeryError("widths and blocks need one entry per stage and at least 3 stages")
    if stem not in STEMS:
        raise SurgeryError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
    sizes = [*widths, *blocks, num_classes, stem_width]
    if min(sizes) < 1 or max(sizes) > MAX_WIDTH:  # torch fails on 0 or less, and far above runs out of memory
        raise SurgeryError(f"widths, blocks, num_classes and stem_width must be from 1 to {MAX_WIDTH}, got widths "
                           f"{list(widths)}, blocks {list(blocks)}, num_classes {num_classes}, stem_width {stem_width}")
    model = CifarResNet(widths, blocks, num_classes, stem_width, stem)
    if layout == Variant.V1:
        _to_v1(model)
    return model


def weights_path(layout: str) -> Path:
    """Where the committed CIFAR-10 weights of ``layout`` live."""
    if layout not in LAYOUTS:
        raise SurgeryError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return WEIGHTS_DIR / f"cifar10_resnet_{layout.replace('.', '_')}.safetensors"


@checked_arguments
def load_cifar_resnet(layout: str = "v1.5") -> nn.Module:
    """The committed CIFAR-10-trained model of ``layout`` ("v1" or "v1.5", or a registered name), in eval mode.

    Args:
        layout: "v1" or "v1.5" (the default), or a name in CIFAR_MODELS such as "cifar10-resnet-v1".

    Returns:
        Module: the model with its trained weights, in eval mode.

    Raises:
        SurgeryError: an unknown layout, or its weights file is missing.
        TypeError: ``layout`` is not a str.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    layout = CIFAR_MODELS.get(layout, layout)
    path = weights_path(layout)
    if not path.is_file():
        raise SurgeryError(f"{path} is missing; train it with `python benchmarks/train_cifar.py --force`")
    # The architecture is stored in the file's metadata by benchmarks/train_cifar.py.
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    model = cifar_resnet(
        meta.get("layout", layout),
        widths=json.loads(meta.get("widths", json.dumps(DEFAULT_WIDTHS))),
        blocks=json.loads(meta.get("blocks", json.dumps(DEFAULT_BLOCKS))),
        stem_width=int(meta.get("stem_width", DEFAULT_STEM_WIDTH)),
        num_classes=int(meta.get("num_classes", 10)),
    )
    model.load_state_dict(load_file(path))
    return model.eval()
