"""Recovery's cheaper and larger steps: reconstruction units that reach past the rewritten block, bfloat16
autocast and channels-last memory format for reconstruction and fine-tuning."""

import copy
import importlib
import warnings

import torch
from test_recovery import quiet_convert
from torch import nn
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from resnet_surgery import history, save
from resnet_surgery.engine.rewrite import convert
from resnet_surgery.recovery.calibrate import calibrate
from resnet_surgery.recovery.finetune import finetune
from resnet_surgery.store import load_into
from resnet_surgery.zoo.cifar import cifar_resnet

crops = importlib.import_module("resnet_surgery.recovery.crops")
reconstruct = importlib.import_module("resnet_surgery.recovery.reconstruct")


def settled(original: nn.Module, size: int) -> nn.Module:
    """``original`` with random BatchNorm scales and running statistics gathered on random ``size`` images."""
    for m in original.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    original.train()
    with torch.no_grad():
        for _ in range(3):
            original(torch.randn(16, 3, size, size))
    return original.eval()


def two_block_stages(to="v1"):
    """A tiny random CIFAR-layout v1.5 model with two blocks in its last two stages, and its conversion."""
    torch.manual_seed(0)
    original = settled(cifar_resnet("v1.5", widths=(8, 8, 16), blocks=(1, 2, 2), stem_width=8), 16)
    return original, quiet_convert(original, to)


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


def wide_maps(to="v1"):
    """A tiny random model on 56x56 images: its first stages' maps are wider than RECONSTRUCT_CROP."""
    torch.manual_seed(0)
    original = settled(cifar_resnet("v1.5", widths=(4, 8, 8), blocks=(1, 1, 1), stem_width=4), 56)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return original, convert(original, to, input_size=(3, 56, 56))


class Centred(nn.Module):
    """Subtracts each map's mean: every output pixel reads the whole map."""

    def forward(self, x):
        return x - x.mean((2, 3), keepdim=True)


def test_wide_maps_train_on_crops_whose_interior_is_the_whole_maps_output():
    original, converted = wide_maps()
    unit = nn.Sequential(converted.layer1[0], converted.layer2[0]).eval()
    x = torch.randn(4, 4, 56, 56)
    with torch.no_grad():
        y = unit(x)
    crop = crops.crop_plan(unit, x, y, crops.CROP_MARGIN, "cpu")
    assert crop is not None and (crop.side, crop.stride) == (crops.RECONSTRUCT_CROP, 2)
    # a drawn crop's interior reproduces exactly the target pixels it is paired with
    part, target = crop.draw(x, y, torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(crop.interior(unit(part)), target, atol=1e-5)
    # a map no wider than the crop, or an op that reads the whole map, trains on whole maps
    assert crops.crop_plan(unit, x[..., :24, :24], y[..., :12, :12], 2, "cpu") is None
    for reads_all in (nn.LayerNorm([28, 28]), Centred()):
        whole = nn.Sequential(unit, reads_all)
        with torch.no_grad():
            assert crops.crop_plan(whole, x, whole(x), 2, "cpu") is None


def test_default_iterations_stop_at_the_work_cap_and_an_explicit_count_is_kept(monkeypatch):
    original, converted = wide_maps()
    data = TensorDataset(torch.randn(48, 3, 56, 56, generator=torch.Generator().manual_seed(1)))
    unit = nn.Sequential(converted.layer1[0], converted.layer2[0])
    side = crops.RECONSTRUCT_CROP
    crop_macs = reconstruct.macs_per_image(unit, torch.zeros(1, 4, side, side))
    monkeypatch.setattr(reconstruct, "RECONSTRUCT_WORK", crop_macs * 37)  # 37 iterations of the cropped unit
    model = calibrate(converted, original, data, num_images=None, steps=("reconstruct",), progress=False)
    first = history(model).calibration.blocks[0]
    assert first.block == "layer2.0" and first.iterations == 37
    # the report says so, and an explicit count is never capped
    assert "37 iterations" in str(history(model).calibration)
    model = calibrate(converted, original, data, num_images=None, steps=("reconstruct",), iterations=60,
                      progress=False)
    assert [b.iterations for b in history(model).calibration.blocks] == [60, 60]


def test_calibration_runs_channels_last_on_copies_and_returns_contiguous_weights():
    original, converted = two_block_stages()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    model = calibrate(converted, original, images(64, 2), num_images=None, iterations=5, progress=False)
    assert all(p.is_contiguous() for p in model.parameters())
    # the caller's original is neither changed nor re-laid out
    assert all(torch.equal(v, before[k]) for k, v in original.state_dict().items())
    assert all(p.is_contiguous() for p in original.parameters())
    # 8 held-back images are too few to measure on: every step is measured on all 64
    report = history(model).calibration
    assert report.num_images == 64 and [s.agreement.num_images for s in report.steps] == [64, 64, 64]
    # from 512 images on, on the held-back eighth; the steps' own images are all of them
    model = calibrate(converted, original, images(512, 3), num_images=None, iterations=5, progress=False)
    report = history(model).calibration
    assert report.num_images == 512 and [s.agreement.num_images for s in report.steps] == [64, 64, 64]
    assert [s.images for s in report.steps] == [0, 512, 512]


def test_the_cifar_models_calibrate_exactly_as_before_the_caps():
    """The caps that make a 224-px ResNet-50 affordable never bind on the committed CIFAR-10 models: every unit
    trains 500 iterations on whole maps with all 2,048 images cached, and BatchNorm reads all of them."""
    from resnet_surgery.recovery.calibrate import BN_WORK
    from resnet_surgery.zoo.cifar import load_cifar_resnet

    original = load_cifar_resnet("v1.5")
    converted = quiet_convert(original, "v1")
    x = torch.randn(2, 3, 32, 32)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        converted(x[:1])
    assert BN_WORK // (counter.get_total_flops() // 2) >= 2048
    units = reconstruct._units(converted.eval(), ["layer2.0", "layer3.0", "layer4.0"], x, True, 0)
    for prev, name in units:
        unit = nn.Sequential(converted.get_submodule(prev), converted.get_submodule(name)).eval()
        with torch.no_grad():
            inputs = reconstruct.capture(converted, converted.get_submodule(prev), x, "input")
            outputs = unit(inputs)
        assert crops.crop_plan(unit, inputs, outputs, crops.CROP_MARGIN, "cpu") is None, name
        assert reconstruct.default_iterations(unit, inputs) == reconstruct.RECONSTRUCT_ITERATIONS, name
        per_image = (inputs[0].numel() + outputs[0].numel()) * 4
        assert 2048 * per_image <= reconstruct.RECONSTRUCT_BYTES, name


def test_batchnorm_work_cap_reads_the_first_images_and_nothing_else(monkeypatch):
    """calibrate's "bn" step equals a direct re-estimation on the images BN_WORK allows (here the first 40):
    counting the model's MACs must not feed a forward pass into the re-estimation's hooks."""
    calibration = importlib.import_module("resnet_surgery.recovery.calibrate")
    from resnet_surgery.recovery.batchnorm import reestimate_bn
    from resnet_surgery.recovery.calibrate import approximate_rewrites

    original, converted = two_block_stages()
    data = images(64, 4)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        converted(data.tensors[0][:1])
    monkeypatch.setattr(calibration, "BN_WORK", 40 * (counter.get_total_flops() // 2))
    model = calibrate(converted, original, data, num_images=None, steps=("bn",), batch_size=16, progress=False,
                      channels_last=False)
    assert history(model).calibration.steps[1].images == 40
    expected = copy.deepcopy(converted)
    norms = [n for r in approximate_rewrites(converted) for n in r.norms]
    batches = [(data.tensors[0][i : i + 16], None) for i in (0, 16)] + [(data.tensors[0][32:40], None)]
    reestimate_bn(expected, norms, batches, reference=original, progress=False)
    for name in norms:
        got, want = model.get_submodule(name), expected.get_submodule(name)
        assert torch.allclose(got.running_mean, want.running_mean, atol=1e-6), name
        assert torch.allclose(got.running_var, want.running_var, atol=1e-6), name
