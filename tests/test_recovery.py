import copy
import importlib
import json
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from util import CaffeResNet

from resnet_surgery import SurgeryError, convert, history
from resnet_surgery.data import cifar10_tensors, normalize_uint8
from resnet_surgery.recovery.batchnorm import reestimate_bn
from resnet_surgery.recovery.calibrate import calibrate
from resnet_surgery.recovery.evaluate import evaluate, predict
from resnet_surgery.recovery.refit import transfer_weights
from resnet_surgery.zoo.cifar import load_cifar_resnet

activations = importlib.import_module("resnet_surgery.recovery.activations")
recovery = importlib.import_module("resnet_surgery.recovery.calibrate")
evaluation = importlib.import_module("resnet_surgery.recovery.evaluate")
refit = importlib.import_module("resnet_surgery.recovery.refit")


class Logits(nn.Module):
    """A 'model' whose input images are its logits: images of shape (C, 1, 1)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x):
        return x.flatten(1) * self.scale


def quiet_convert(model, to, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(model, to, input_size=(3, 32, 32), **kw)


# --- evaluate -------------------------------------------------------------------------------------


def test_evaluate_counts_top1_top5_agreement_and_kl():
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 9]])
    labels = torch.tensor([0, 0, 3, 5])  # top-1 right: 0 and 3; top-5 right: 0, 2, 3 (image 1 has 0 last)
    data = TensorDataset(logits[:, :, None, None], labels)
    report = evaluate(Logits(), data, batch_size=3, progress=False)
    assert report.num_images == 4
    assert report.top1 == pytest.approx(50.0) and report.top5 == pytest.approx(75.0)
    assert report.agreement is None and report.kl is None

    same = evaluate(Logits(), data, reference=Logits(), progress=False)
    assert same.agreement == 100.0 and same.kl == pytest.approx(0.0, abs=1e-6)
    # Scaling logits keeps every argmax, changes the softmax: full agreement, positive KL equal to the direct sum.
    scaled = evaluate(Logits(2.0), data, reference=Logits(), progress=False)
    p, q = logits.log_softmax(1), (2 * logits).log_softmax(1)
    assert scaled.agreement == 100.0
    assert scaled.kl == pytest.approx(float((p.exp() * (p - q)).sum(1).mean()), rel=1e-5)
    assert "top-1 50.00%" in str(report) and set(scaled.to_dict()) >= {"top1", "top5", "agreement", "kl"}
    # The reference may be given as its logits, once for many comparisons.
    ref = predict(Logits(), data, batch_size=3, progress=False)
    assert torch.equal(ref, logits)
    assert evaluate(Logits(2.0), data, reference=ref, batch_size=2, progress=False).kl == pytest.approx(scaled.kl)
    with pytest.raises(SurgeryError, match="cover 3 images but the data has"):
        evaluate(Logits(), data, reference=ref[:3], progress=False)


def test_evaluate_without_labels_and_keeps_train_flags():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(10))
    model(torch.randn(2, 3, 8, 8))
    model.train()
    model[1].eval()  # a mixed state must come back as it was
    before = copy.deepcopy(model.state_dict())
    report = evaluate(model, DataLoader(torch.randn(10, 3, 8, 8), batch_size=4), reference=model, progress=False)
    assert report.num_images == 10 and report.top1 is None and report.agreement == 100.0
    assert model.training and not model[1].training and model[0].training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # eval mode: no BN update


# --- the two calibration steps on known answers ---------------------------------------------------


def test_reestimate_bn_gives_exact_statistics_and_touches_only_the_named_norms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5))
    model.eval()
    other = copy.deepcopy(model[4].state_dict())
    images = torch.randn(40, 3, 9, 9) * 3 + 1
    batches = [(images[i : i + 16], None) for i in range(0, 40, 16)]  # uneven last batch
    assert reestimate_bn(model, ["1"], batches, progress=False) == 40
    with torch.no_grad():
        x = model[0](images)
    # Cumulative averaging (momentum=None) = the average of per-batch statistics.
    means = [model[0](b).mean((0, 2, 3)) for b, _ in batches]
    vars_ = [model[0](b).var((0, 2, 3), unbiased=True) for b, _ in batches]
    assert torch.allclose(model[1].running_mean, torch.stack(means).mean(0), atol=1e-5)
    assert torch.allclose(model[1].running_var, torch.stack(vars_).mean(0), atol=1e-4)
    assert not torch.allclose(model[1].running_mean, x.new_zeros(4))
    assert model[1].momentum == 0.1 and not model.training and not model[1].training
    assert all(torch.equal(v, model[4].state_dict()[k]) for k, v in other.items())


def test_reestimate_bn_against_the_original_matches_its_normalisation():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1))
    original[1].running_mean.uniform_(-1, 1)  # statistics that do not describe the calibration images
    original[1].running_var.uniform_(0.5, 2)
    original.eval()
    images = torch.randn(64, 3, 9, 9)
    batches = [(images[:32], None), (images[32:], None)]
    # Same activations: the statistics stay as they were (plain re-estimation would replace them).
    same = copy.deepcopy(original)
    reestimate_bn(same, ["1"], batches, reference=original, progress=False)
    assert torch.allclose(same[1].running_mean, original[1].running_mean, atol=1e-5)
    assert torch.allclose(same[1].running_var, original[1].running_var, rtol=1e-4)
    # An affine change of the activations (conv weights x3, bias shifted) is undone exactly.
    changed = copy.deepcopy(original)
    with torch.no_grad():
        changed[0].weight.mul_(3)
        changed[0].bias.mul_(3).add_(1)
    reestimate_bn(changed, ["1"], batches, reference=original, progress=False)
    with torch.no_grad():
        assert torch.allclose(changed(images), original(images), atol=1e-3)


@pytest.mark.parametrize(
    "kw",
    [
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=3, stride=1, padding=2, dilation=2, bias=True),
        dict(kernel_size=3, stride=2, padding=1, groups=4),  # ResNeXt-style grouped conv: per-group fits
        dict(kernel_size=1, stride=1, padding=0, padding_mode="zeros"),
        dict(kernel_size=3, stride=1, padding="same", padding_mode="reflect"),
    ],
)
def test_transfer_recovers_a_conv_exactly_when_it_can(kw, monkeypatch):
    # Few rows per batch: the spatial sampling path must still give the exact answer on noise-free targets.
    monkeypatch.setattr(refit, "MAX_ROWS_PER_BATCH", 200)
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(8, 8, **kw))
    converted = nn.Sequential(nn.Conv2d(8, 8, **kw))  # same shape, other weights: the fit must find the original
    images = torch.randn(24, 8, 10, 10)
    fits = transfer_weights(converted, original, {"0": "0"}, [(images[:12], None), (images[12:], None)],
                            ridge=1e-9, progress=False)
    assert fits[0].error_before > 0.5 and fits[0].error_after < 1e-6
    conv = original[0]
    kh, kw = conv.kernel_size
    assert fits[0].unknowns == conv.in_channels // conv.groups * kh * kw + (conv.bias is not None)
    assert torch.allclose(converted[0].weight, original[0].weight, atol=1e-4)
    if original[0].bias is not None:
        assert torch.allclose(converted[0].bias, original[0].bias, atol=1e-4)


# --- calibrate ----------------------------------------------------------------------------------


def test_report_flags_a_fit_with_too_few_positions():
    step = recovery.CalibrationStep("naive copy", 0, 0, 0.0, 0.0, evaluation.EvalReport(10, agreement=90.0, kl=0.1))
    fits = [refit.ConvFit("a", "a", 10, 72, 1.0, 0.0), refit.ConvFit("b", "b", 10_000, 72, 1.0, 0.5)]
    text = str(recovery.CalibrationReport(10, 1e-3, [step], fits)).splitlines()
    assert "only 10 positions for 72 weights: use more images" in text[-2]
    assert "use more images" not in text[-1]


def test_calibrate_refuses_bad_input():
    model = nn.Sequential(nn.Conv2d(3, 3, 1))
    data = TensorDataset(torch.randn(4, 3, 8, 8))
    with pytest.raises(SurgeryError, match="the model has no recipe"):
        calibrate(model, model, data, progress=False)
    model = convert(CaffeResNet(), "v1", input_size=(3, 8, 8))  # already v1: a recipe with no rewrites
    with pytest.raises(SurgeryError, match="unknown calibration step 'bm'"):
        calibrate(model, model, data, steps=("bm",), progress=False)
    # Nothing approximate: nothing to calibrate, said plainly.
    with pytest.raises(SurgeryError, match="nothing to calibrate"):
        calibrate(model, model, data, progress=False)


@pytest.fixture(scope="module")
def cifar(shared_data):
    """512 unlabelled training images for calibration, 512 labelled test images held out."""
    train, _ = cifar10_tensors(shared_data, "train")
    test, labels = cifar10_tensors(shared_data, "test")
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(train), generator=g)[:512]
    held = torch.randperm(len(test), generator=g)[:512]
    return TensorDataset(normalize_uint8(train[pick])), TensorDataset(normalize_uint8(test[held]), labels[held])


@pytest.mark.slow
@pytest.mark.parametrize("source, to", [("v1.5", "v1"), ("v1", "d")])
def test_calibration_steps_never_lose_agreement_and_recover_held_out(cifar, source, to):
    calib, held_out = cifar
    original = load_cifar_resnet(source)
    converted = quiet_convert(original, to)
    state = copy.deepcopy(converted.state_dict())
    model = calibrate(converted, original, calib, num_images=None, steps=("bn", "transfer", "reconstruct"),
                      iterations=150, batch_size=128, progress=False)
    report = history(model).calibration
    assert [s.step for s in report.steps] == ["naive copy", "bn", "transfer", "reconstruct"]
    assert report.num_images == 512 and report.steps[1].images == 512
    agreement = [s.agreement.agreement for s in report.steps]
    kl = [s.agreement.kl for s in report.steps]
    assert agreement[1] >= agreement[0] and agreement[2] >= agreement[1] and agreement[3] >= agreement[2], str(report)
    assert kl[1] < kl[0] and kl[2] < kl[1] and kl[3] < kl[2], str(report)
    assert all(f.error_after < f.error_before for f in report.fits)
    assert report.blocks and all(b.error_after < b.error_before for b in report.blocks), str(report)
    assert all(torch.equal(v, converted.state_dict()[k]) for k, v in state.items())  # input untouched
    assert history(model).recipe.calibration["num_images"] == 512

    # On held-out labelled images: the naive copy hurt, calibration measurably repairs it.
    base = evaluate(original, held_out, batch_size=256, progress=False)
    naive = evaluate(converted, held_out, reference=original, batch_size=256, progress=False)
    fixed = evaluate(model, held_out, reference=original, batch_size=256, progress=False)
    assert naive.agreement < 97.0 and naive.top1 < base.top1 - 1.0, (base, naive)
    assert fixed.agreement > naive.agreement + 2.0 and fixed.kl < naive.kl / 2, (naive, fixed)
    assert fixed.top1 > naive.top1 + 1.0, (naive, fixed)


# --- command line -----------------------------------------------------------------------------------


def cli(*args):
    from click.testing import CliRunner

    from resnet_surgery.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def cifar_folder(shared_data, tmp_path_factory):
    """An ImageFolder of 100 CIFAR-10 test images, 10 per class."""
    import tarfile

    root = tmp_path_factory.mktemp("cifar")
    with tarfile.open(shared_data / "cifar10" / "test.tar") as tf:
        members = [m for m in tf.getmembers() if m.isfile() and m.name.split("/")[-1].startswith("000")]
        tf.extractall(root, members=members, filter="data")
    return root / "test"


@pytest.mark.slow
def test_cli_evaluate_calibrate_finetune(cifar_folder, tmp_path):
    conv, cal, ft = tmp_path / "conv", tmp_path / "cal", tmp_path / "ft"
    assert cli("convert", "cifar10-resnet-v1.5", "--weights", "DEFAULT", "--to", "v1", "--input-size", 32,
               "--out", conv).exit_code == 0
    data = ("--data", cifar_folder, "--preset", "cifar10")
    reference = ("--reference", "cifar10-resnet-v1.5", "--reference-weights", "DEFAULT")
    naive = cli("evaluate", conv, *data, *reference, "--json")
    assert naive.exit_code == 0, naive.output
    naive = json.loads(naive.output)
    assert naive["num_images"] == 100 and naive["agreement"] < 100 and naive["top1"] is not None

    result = cli("calibrate", conv, *data, "--num-images", 100, "--iterations", 20, "--out", cal)
    assert result.exit_code == 0, result.output
    assert "reconstruct layer1.0 + layer2.0" in result.output and "written:" in result.output
    fixed = json.loads(cli("evaluate", cal, *data, *reference, "--json").output)
    assert fixed["kl"] < naive["kl"]
    assert "calibration" in json.loads((cal / "recipe.json").read_text())

    result = cli("finetune", cal, *data, "--epochs", 1, "--batch-size", 50, "--lr", 0.001, "--out", ft, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["steps"] == 2
    assert (ft / "model.safetensors").is_file() and not (tmp_path / "ft.checkpoint.pt").exists()


@pytest.mark.slow
def test_cli_reconstruction_and_feature_options_round_trip(cifar_folder, tmp_path):
    conv, cal, ft = tmp_path / "conv", tmp_path / "cal", tmp_path / "ft"
    assert cli("convert", "cifar10-resnet-v1", "--weights", "DEFAULT", "--to", "d", "--input-size", 32,
               "--out", conv).exit_code == 0
    data = ("--data", cifar_folder, "--preset", "cifar10")
    result = cli("calibrate", conv, *data, "--num-images", 40, "--steps", "reconstruct", "--iterations", 7,
                 "--lr", 0.002, "--block-only", "--seed", 3, "--out", cal, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [s["step"] for s in report["steps"]] == ["naive copy", "reconstruct"] and report["num_images"] == 40
    assert [(b["iterations"], b["previous"]) for b in report["blocks"]] == [(7, None)] * 3
    assert json.loads((cal / "recipe.json").read_text())["calibration"]["blocks"][0]["iterations"] == 7

    result = cli("finetune", cal, *data, "--objective", "features", "--steps", 3, "--augment", "cifar",
                 "--batch-size", 20, "--out", ft, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["objective"], report["steps"], report["budget_steps"], report["epochs"]) == ("features", 3, 3, 1)
    assert json.loads((ft / "recipe.json").read_text())["finetune"]["objective"] == "features"
    bad = cli("finetune", cal, *data, "--objective", "pixels", "--out", tmp_path / "x")
    assert bad.exit_code == 2 and "pixels" in bad.output


@pytest.mark.slow
def test_cli_run_with_calibrate_and_finetune_records_both(cifar_folder, tmp_path):
    out = tmp_path / "run"
    result = cli("run", "cifar10-resnet-v1", "--weights", "DEFAULT", "--to", "v1.5", "--input-size", 32,
                 "--calibrate", cifar_folder, "--finetune", cifar_folder, "--preset", "cifar10", "--num-images", 64, "--iterations", 10,
                 "--min-time", 0.2, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    steps = [s["step"] for s in report["calibration"]["steps"]]
    assert steps == ["naive copy", "bn", "reconstruct"] and report["calibration"]["num_images"] == 64
    assert report["finetune"]["images"] == 100 and report["finetune"]["epochs"] == 1
    recipe = json.loads((out / "converted" / "recipe.json").read_text())
    assert {"calibration", "finetune"} <= set(recipe) and recipe["variant_after"] == "v1.5"
    assert all(p["passed"] for p in report["parity"].values())
    assert not (out / "finetune.ckpt").exists()


def test_cli_bad_input_is_one_line_and_exit_2(cifar_folder, tmp_path):
    conv = tmp_path / "conv"
    assert cli("convert", "cifar10-resnet-v1.5", "--to", "d", "--input-size", 32, "--out", conv).exit_code == 0
    cases = [
        (("evaluate", conv, "--data", cifar_folder, "--mean", "0.5,0.5"), "--mean needs three"),
        (("calibrate", conv, "--data", cifar_folder, "--steps", "bn,fit", "--out", tmp_path / "x"),
         "unknown calibration step 'fit'"),
        (("calibrate", conv, "--data", cifar_folder, "--out", conv), "already exists; pass --force"),
        (("finetune", conv, "--data", cifar_folder, "--out", tmp_path / "y", "--resume"), "no checkpoint at"),
    ]
    for args, message in cases:
        result = cli(*args)
        assert result.exit_code == 2 and message in result.output, result.output
        assert result.output.count("\n") == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# --- block reconstruction ---------------------------------------------------------------------------


def tiny_conversion(to="v1", layout="v1.5", **kw):
    """A tiny random CIFAR-layout model (BatchNorm statistics from a few batches) and its conversion."""
    from resnet_surgery.zoo.cifar import cifar_resnet

    torch.manual_seed(0)
    original = cifar_resnet(layout, widths=(8, 8, 16), blocks=(1, 1, 1), stem_width=8)
    for m in original.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)  # torchvision zero-inits bn3: make every branch count
    original.train()
    with torch.no_grad():
        for _ in range(3):
            original(torch.randn(16, 3, 16, 16))
    return original.eval(), quiet_convert(original, to, **kw)


def block_errors(model, original, blocks, images):
    """Relative MSE of each block's output, fed with ``model``'s own input to it, against ``original``'s."""
    errors = []
    with torch.no_grad():
        for b in blocks:
            x = activations.capture(model, model.get_submodule(b), images, "input")
            y = activations.capture(original, original.get_submodule(b), images, "output")
            errors.append(float(((model.get_submodule(b)(x) - y) ** 2).sum() / ((y - y.mean((0, 2, 3), keepdim=True)) ** 2).sum()))
    return errors


def test_reconstruct_lowers_every_block_error_and_touches_nothing_else():
    original, converted = tiny_conversion("v1")
    images = torch.randn(96, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    data = TensorDataset(images)
    blocks = [r.block for r in recovery.approximate_rewrites(converted)]
    assert blocks == ["layer2.0", "layer3.0"]
    model = calibrate(converted, original, data, num_images=None, steps=("reconstruct",), iterations=60, lr=3e-2,
                      batch_size=32, progress=False)
    report = history(model).calibration
    assert [s.step for s in report.steps] == ["naive copy", "reconstruct"]
    assert [b.block for b in report.blocks] == blocks and all(b.images == 96 for b in report.blocks)
    assert all(b.error_after < 0.7 * b.error_before for b in report.blocks), str(report)
    before, after = block_errors(converted, original, blocks, images), block_errors(model, original, blocks, images)
    assert all(a < 0.7 * b for a, b in zip(after, before)), (before, after)
    assert report.steps[1].agreement.kl < report.steps[0].agreement.kl
    # Each rewritten block is optimised with the block that feeds it (layer1.0 feeds layer2.0, which feeds layer3.0).
    assert [b.previous for b in report.blocks] == ["layer1.0", "layer2.0"]
    new, old = model.state_dict(), converted.state_dict()
    changed = {k for k in old if not torch.equal(new[k], old[k])}
    assert changed and all(k.startswith(("layer1.0.", "layer2.0.", "layer3.0.")) for k in changed)
    # Norms stay in eval mode: running statistics are untouched, only weights, biases and affines train.
    assert not any("running" in k or "num_batches" in k for k in changed)
    assert "reconstruct layer1.0 + layer2.0: relative error" in str(report)

    again = calibrate(converted, original, data, num_images=None, steps=("reconstruct",), iterations=60, lr=3e-2,
                      batch_size=32, progress=False)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in new.items())  # deterministic under a seed
    other = calibrate(converted, original, data, num_images=None, steps=("reconstruct",), iterations=60, lr=3e-2,
                      batch_size=32, seed=1, progress=False)
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in new.items())

    alone = calibrate(converted, original, data, num_images=None, steps=("reconstruct",), iterations=60, lr=3e-2,
                      batch_size=32, previous=False, progress=False)
    assert [b.previous for b in history(alone).calibration.blocks] == [None, None]
    changed = {k for k in old if not torch.equal(alone.state_dict()[k], old[k])}
    assert changed and all(k.startswith(("layer2.0.", "layer3.0.")) for k in changed)
    assert block_errors(alone, original, blocks, images)[0] < 0.7 * before[0]


def test_default_calibration_is_bn_then_reconstruct():
    original, converted = tiny_conversion("d")
    model = calibrate(converted, original, TensorDataset(torch.randn(32, 3, 16, 16)), iterations=5, progress=False)
    report = history(model).calibration
    assert [s.step for s in report.steps] == ["naive copy", "bn", "reconstruct"] and not report.fits
    assert history(model).recipe.calibration["blocks"][0]["iterations"] == 5


def test_reconstruct_refuses_an_exact_conversion_and_bad_options():
    data = TensorDataset(torch.randn(8, 3, 16, 16))
    original, exact = tiny_conversion("v1.5", layout="v1", exact=True)
    with pytest.raises(SurgeryError, match="nothing to calibrate"):
        calibrate(exact, original, data, progress=False)
    with pytest.raises(SurgeryError, match="nothing to calibrate"):
        calibrate(quiet_convert(original, "v1"), original, data, progress=False)  # a no-op conversion
    # An exact step after an approximate one still leaves the approximate rewrites to repair.
    original, converted = tiny_conversion()
    pruned = quiet_convert(converted, None, prune_dead=True)
    assert [r.block for r in recovery.approximate_rewrites(pruned)] == ["layer2.0", "layer3.0"]
    with pytest.raises(SurgeryError, match="iterations from 1 to"):
        calibrate(converted, original, data, iterations=0, progress=False)
