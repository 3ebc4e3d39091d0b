import pytest
import torch
from torchvision.models.resnet import Bottleneck

from resnet_surgery.data import cifar10_tensors, normalize_uint8
from resnet_surgery.errors import SurgeryError
from resnet_surgery.zoo.cifar import CIFAR_MODELS, cifar_resnet, load_cifar_resnet, weights_path


def downsampling_blocks(model):
    return [m for m in model.modules() if isinstance(m, Bottleneck) and m.downsample is not None
            and m.downsample[0].stride == (2, 2)]


@pytest.mark.parametrize("layout, conv1_stride, conv2_stride", [("v1.5", (1, 1), (2, 2)), ("v1", (2, 2), (1, 1))])
def test_layout_puts_the_stride_where_intended(layout, conv1_stride, conv2_stride):
    model = cifar_resnet(layout)
    down = downsampling_blocks(model)
    assert len(down) >= 2
    assert all(b.conv1.stride == conv1_stride and b.conv2.stride == conv2_stride for b in down)
    # Every other block and the stem keep stride 1 (CIFAR stem: 3x3, no max-pool).
    others = [m for m in model.modules() if isinstance(m, Bottleneck) and m not in down]
    assert all(b.conv1.stride == b.conv2.stride == (1, 1) for b in others)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())


def test_torchvision_layout_and_output_shape():
    model = cifar_resnet("v1", widths=(8, 16, 32), blocks=(1, 2, 1)).eval()
    for name in ("conv1", "bn1", "relu", "layer1", "layer2", "layer3", "avgpool", "fc"):
        assert hasattr(model, name)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # v1 and v1.5 differ only in strides: same parameter names and shapes.
    a, b = cifar_resnet("v1").state_dict(), cifar_resnet("v1.5").state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_bad_arguments():
    with pytest.raises(SurgeryError, match="layout"):
        cifar_resnet("d")
    with pytest.raises(SurgeryError, match="3 stages"):
        cifar_resnet(widths=(16, 32), blocks=(1, 1))


@pytest.mark.parametrize("name", sorted(CIFAR_MODELS))
def test_committed_weights_score_well(name, shared_data):
    assert weights_path(CIFAR_MODELS[name]).stat().st_size < 5_000_000  # small enough to commit
    model = load_cifar_resnet(name)
    images, labels = cifar10_tensors(shared_data, "test")
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:500]
    with torch.no_grad():
        top1 = (model(normalize_uint8(images[idx])).argmax(1) == labels[idx]).float().mean().item()
    assert top1 >= 0.82  # full test set: 85.09% (v1), 85.06% (v1.5); this subset: 85.6%, 85.2%
    # The stride placement survives the round trip through the file.
    assert all(b.conv2.stride == ((2, 2) if CIFAR_MODELS[name] == "v1.5" else (1, 1))
               for b in downsampling_blocks(model))
