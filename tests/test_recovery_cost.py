"""Recovery's cheaper and larger steps: reconstruction units that reach past the rewritten block, bfloat16
autocast and channels-last memory format for reconstruction and fine-tuning."""

import torch
from test_recovery import quiet_convert
from torch import nn
from torch.utils.data import TensorDataset

import resnet_surgery.recovery.reconstruct as reconstruct
from resnet_surgery import history, save
from resnet_surgery.recovery.calibrate import calibrate
from resnet_surgery.recovery.finetune import finetune
from resnet_surgery.store import load_into
from resnet_surgery.zoo.cifar import cifar_resnet


def two_block_stages(to="v1"):
    """A tiny random CIFAR-layout v1.5 model with two blocks in its last two stages, and its conversion."""
    torch.manual_seed(0)
    original = cifar_resnet("v1.5", widths=(8, 8, 16), blocks=(1, 2, 2), stem_width=8)
    for m in original.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    original.train()
    with torch.no_grad():
        for _ in range(3):
            original(torch.randn(16, 3, 16, 16))
    return original.eval(), quiet_convert(original, to)


def images(n: int, seed: int) -> TensorDataset:
    return TensorDataset(torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)))


def test_after_trains_the_blocks_that_follow_against_the_originals_output_after_the_last(monkeypatch):
    original, converted = two_block_stages()
    targets = []
    unit_io = reconstruct._unit_io

    def spy(model, reference, unit, first, name, *args):
        targets.append((first, name, len(unit)))
        return unit_io(model, reference, unit, first, name, *args)

    monkeypatch.setattr(reconstruct, "_unit_io", spy)
    # after=5 stops at each stage's end: never past the next rewritten block (layer3.0), nor past the last block.
    model = calibrate(converted, original, images(64, 1), num_images=None, steps=("reconstruct",), after=5,
                      iterations=20, lr=3e-2, batch_size=32, progress=False)
    blocks = history(model).calibration.blocks
    assert [(b.previous, b.block, b.following) for b in blocks] == [
        ("layer1.0", "layer2.0", ["layer2.1"]), ("layer2.1", "layer3.0", ["layer3.1"])]
    assert targets == [("layer1.0", "layer2.1", 3), ("layer2.1", "layer3.1", 3)]
    assert "layer1.0 + layer2.0 + layer2.1" in str(history(model).calibration)
    # The block after the rewritten one trained too (it was not rewritten, so only reconstruction moves it).
    trained = [b for b in blocks if b.kept.startswith("best")]
    assert trained, str(history(model).calibration)
    for b in trained:
        following = b.following[0]
        assert not torch.equal(model.get_submodule(following).conv1.weight,
                               converted.get_submodule(following).conv1.weight)
    assert all(b.error_after <= b.error_before for b in blocks)

    plain = calibrate(converted, original, images(64, 1), num_images=None, steps=("reconstruct",),
                      iterations=2, progress=False)
    assert [b.following for b in history(plain).calibration.blocks] == [[], []]  # after=0: the block alone


def test_bf16_channels_last_reconstruction_returns_contiguous_finite_weights_that_save(tmp_path):
    original, converted = two_block_stages()
    model = calibrate(converted, original, images(64, 1), num_images=None, iterations=20, lr=3e-2,
                      batch_size=32, bf16=True, channels_last=True, progress=False)
    report = history(model).calibration
    assert all(b.error_after <= b.error_before for b in report.blocks), str(report)
    assert any(b.kept.startswith("best") for b in report.blocks), str(report)
    for name, p in model.state_dict().items():
        assert p.is_contiguous(), name
        assert not p.is_floating_point() or (p.dtype == torch.float32 and torch.isfinite(p).all()), name
    assert all(p.is_contiguous() for p in converted.parameters())  # the input is left as it was
    out = save(model, tmp_path / "calibrated")
    rebuilt = load_into(cifar_resnet("v1.5", widths=(8, 8, 16), blocks=(1, 2, 2), stem_width=8), out)
    assert torch.equal(rebuilt.state_dict()["layer2.0.conv1.weight"], model.state_dict()["layer2.0.conv1.weight"])


def test_channels_last_finetuning_leaves_the_teacher_alone_and_returns_contiguous_weights():
    original, converted = two_block_stages()
    data = TensorDataset(images(32, 1).tensors[0], torch.randint(0, 10, (32,)))
    tuned = finetune(converted, original, data, steps=3, batch_size=16, channels_last=True, bf16=True,
                     progress=False)
    assert history(tuned).finetune.steps == 3
    assert all(p.is_contiguous() for p in tuned.parameters())
    assert all(p.is_contiguous() for p in original.parameters())
    assert all(torch.isfinite(p).all() for p in tuned.parameters())
