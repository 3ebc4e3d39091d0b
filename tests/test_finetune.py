import importlib
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from resnet_surgery import SurgeryError, convert, history
from resnet_surgery.history import record
from resnet_surgery.recovery.distill import distillation_loss
from resnet_surgery.recovery.finetune import finetune
from resnet_surgery.zoo.cifar import cifar_resnet

finetune_module = importlib.import_module("resnet_surgery.recovery.finetune")
REPO = Path(__file__).resolve().parents[1]


def tiny_pair(seed: int = 0):
    """A tiny v1 teacher (BatchNorm statistics from a few batches) and its approximate v1.5 conversion."""
    torch.manual_seed(seed)
    teacher = cifar_resnet("v1", widths=(8, 8, 16), blocks=(1, 1, 1), stem_width=8)
    for m in teacher.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)  # torchvision zero-inits bn3: make every branch count
    teacher.train()
    with torch.no_grad():
        for _ in range(3):
            teacher(torch.randn(16, 3, 16, 16))
    teacher.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = convert(teacher, "v1.5", input_size=(3, 16, 16))
    return teacher, student


def synthetic(n: int = 64, labels: bool = True, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=g)
    return TensorDataset(images, torch.randint(0, 10, (n,), generator=g)) if labels else TensorDataset(images)


@pytest.fixture
def keep_trained(monkeypatch):
    """Tests of training's mechanics look at what training did: the guard (test_recovery_guard) keeps it always."""
    monkeypatch.setattr(finetune_module, "keep_better", lambda trained, given, before, after: (trained, "trained"))


def states_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_distillation_loss():
    t = torch.randn(8, 10)
    assert float(distillation_loss(t, t, 4.0)) == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(8, 10)
    kl1 = distillation_loss(s, t, 1.0)
    expected = (t.softmax(1) * (t.log_softmax(1) - s.log_softmax(1))).sum(1).mean()
    assert float(kl1) == pytest.approx(float(expected), rel=1e-5)


def test_finetune_lowers_the_distillation_loss_and_leaves_the_input_alone():
    teacher, student = tiny_pair()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    out = finetune(student, teacher, synthetic(labels=False), epochs=4, batch_size=16, lr=0.05, progress=False)
    report = history(out).finetune
    assert report.steps == 16 and report.images == 256 and report.world_size == 1
    assert report.loss_end < report.loss_start * 0.8, report
    assert states_equal(before, student.state_dict())
    assert not out.training and history(out).recipe.finetune is not None


def test_freeze_rewritten_trains_only_the_rewritten_blocks(keep_trained):
    teacher, student = tiny_pair()
    blocks = {r.block for r in history(student).recipe.rewrites}
    out = finetune(student, teacher, DataLoader(synthetic(), batch_size=16), freeze="rewritten", lr=0.05,
                   progress=False)
    changed = {k for k, v in out.state_dict().items() if not torch.equal(v, student.state_dict()[k])}
    assert changed and all(any(k.startswith(b + ".") for b in blocks) for k in changed)
    assert any(k.startswith("layer2.0.") and k.endswith("running_mean") for k in changed)  # trained BN: train mode


def test_resume_after_a_kill_continues_at_epoch_2_and_matches_an_unbroken_run(tmp_path, keep_trained):
    teacher, student = tiny_pair()
    data = synthetic()
    unbroken = finetune(student, teacher, data, epochs=2, batch_size=16, progress=False)

    ckpt = tmp_path / "run.pt"
    calls = {"n": 0}

    def killer(module, args):
        calls["n"] += 1
        if calls["n"] > 9:  # 4 passes measure the input (the guard), 4 steps make an epoch: die in the second
            raise KeyboardInterrupt

    handle = student.register_forward_pre_hook(killer)
    try:
        with pytest.raises(KeyboardInterrupt):
            finetune(student, teacher, data, epochs=2, batch_size=16, checkpoint=ckpt, progress=False)
    finally:
        handle.remove()
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 4

    with pytest.raises(SurgeryError, match="already exists"):
        finetune(student, teacher, data, epochs=2, batch_size=16, checkpoint=ckpt, progress=False)
    with pytest.raises(SurgeryError, match="epochs=2"):
        finetune(student, teacher, data, epochs=3, batch_size=16, checkpoint=ckpt, resume=True, progress=False)
    resumed = finetune(student, teacher, data, epochs=2, batch_size=16, checkpoint=ckpt, resume=True, progress=False)
    report = history(resumed).finetune
    assert report.start_epoch == 1 and report.steps == 4
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    for k, v in unbroken.state_dict().items():
        assert torch.allclose(v.float(), resumed.state_dict()[k].float(), atol=1e-5), k


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    teacher, student = tiny_pair()
    ckpt = tmp_path / "run.pt"
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        return output * math.nan if calls["n"] > 10 else output  # after the guard's 4 passes and 6 steps

    handle = student.register_forward_hook(poison)
    try:
        with pytest.raises(SurgeryError, match=r"loss became nan in epoch 2 .*last good checkpoint \(epoch 1\)"):
            finetune(student, teacher, synthetic(), epochs=3, batch_size=16, checkpoint=ckpt, progress=False)
    finally:
        handle.remove()
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())

    # Divergence before any epoch ends: nothing is written, the message says so.
    fresh = tmp_path / "fresh.pt"
    calls["n"] = 6  # the next forward pass after the guard's is poisoned: the first step diverges
    handle = student.register_forward_hook(poison)
    try:
        with pytest.raises(SurgeryError, match="no checkpoint was written"):
            finetune(student, teacher, synthetic(), batch_size=16, checkpoint=fresh, progress=False)
    finally:
        handle.remove()
    assert not fresh.exists() and not list(tmp_path.glob(".fresh*"))
    with pytest.raises(SurgeryError, match=r"lr must be in \(0, 10\]"):  # one that overflows float32: refused first
        finetune(student, teacher, synthetic(), lr=1e30, batch_size=16, checkpoint=fresh, progress=False)


def test_finetune_refuses_bad_options(tmp_path):
    teacher, student = tiny_pair()
    with pytest.raises(SurgeryError, match="unknown optimizer"):
        finetune(student, teacher, synthetic(), optimizer="lion", progress=False)
    with pytest.raises(SurgeryError, match="unknown freeze"):
        finetune(student, teacher, synthetic(), freeze="all", progress=False)
    with pytest.raises(SurgeryError, match="no checkpoint at"):
        finetune(student, teacher, synthetic(), checkpoint=tmp_path / "none.pt", resume=True, progress=False)


WORKER = """
import importlib, json, os, sys, warnings
import torch
sys.path.insert(0, {tests!r})
from test_finetune import synthetic, tiny_pair
from resnet_surgery import history
from resnet_surgery.recovery.finetune import finetune
finetune_module = importlib.import_module("resnet_surgery.recovery.finetune")

# Training's mechanics under torchrun: the guard (test_recovery_guard) keeps what training did.
finetune_module.keep_better = lambda trained, given, before, after: (trained, "trained")
teacher, student = tiny_pair()
out = finetune(student, teacher, synthetic(n=64), epochs=3, batch_size=8, lr=0.05, optimizer="sgd",
               checkpoint=os.path.join(sys.argv[1], "ckpt.pt"), progress=False)
rank = os.environ["RANK"]
torch.save(out.state_dict(), os.path.join(sys.argv[1], f"rank{{rank}}.pt"))
with open(os.path.join(sys.argv[1], f"rank{{rank}}.json"), "w") as f:
    json.dump(history(out).finetune.to_dict(), f)
"""


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu_end_with_identical_weights(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER.format(tests=str(REPO / "tests"))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert states_equal(a, b)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and states_equal(ckpt["model"], a)
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 12 and report["images"] == 192  # 64 images / 2 / 8
    assert report["loss_end"] < report["loss_start"], report


# --- feature mimicking ------------------------------------------------------------------------------------


def pre_pool_mse(student, teacher, data) -> float:
    """Mean squared difference of the feature maps entering the global pool, on ``data`` (eval mode)."""
    feats = {}
    hooks = [m.avgpool.register_forward_pre_hook(lambda _, a, k=k: feats.__setitem__(k, a[0]))
             for k, m in (("s", student), ("t", teacher))]
    x = data.tensors[0]
    with torch.no_grad():
        student.eval()(x), teacher.eval()(x)
    for h in hooks:
        h.remove()
    return float(((feats["s"] - feats["t"]) ** 2).mean())


def test_features_objective_lowers_the_feature_error_and_keeps_the_classifier():
    teacher, student = tiny_pair()
    data = synthetic(labels=False)
    out = finetune(student, teacher, data, objective="features", steps=24, batch_size=16, lr=3e-3,
                   augment="cifar", progress=False)
    report = history(out).finetune
    assert report.objective == "features" and report.steps == 24 and report.epochs == 6  # 4 batches a pass
    assert pre_pool_mse(out, teacher, data) < 0.8 * pre_pool_mse(student, teacher, data)
    assert torch.equal(out.fc.weight, student.fc.weight) and torch.equal(out.fc.bias, student.fc.bias)
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in out.state_dict().items() if "conv" in k)


def test_step_budget_spans_the_schedule_and_is_deterministic():
    teacher, student = tiny_pair()
    runs = [finetune(student, teacher, synthetic(n=40, labels=False), objective="both", steps=7, batch_size=16,
                     augment="cifar", seed=3, progress=False) for _ in range(2)]
    assert states_equal(runs[0].state_dict(), runs[1].state_dict())
    report = history(runs[0]).finetune
    assert report.steps == 7 and report.budget_steps == 7 and report.epochs == 3  # 3 batches a pass
    other = finetune(student, teacher, synthetic(n=40, labels=False), objective="both", steps=7, batch_size=16,
                     augment="cifar", seed=4, progress=False)
    assert not states_equal(other.state_dict(), runs[0].state_dict())


def test_features_and_recovery_refuse_what_they_cannot_do():
    teacher, student = tiny_pair()
    with pytest.raises(SurgeryError, match="unknown objective"):
        finetune(student, teacher, synthetic(), objective="feature", progress=False)
    with pytest.raises(SurgeryError, match="unknown augmentation"):
        finetune(student, teacher, synthetic(), augment="autoaugment", progress=False)

    class NoPool(torch.nn.Module):  # classifies the flattened map: nothing reduces over the spatial axes
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4 * 14 * 14, 10)

        def forward(self, x):
            return self.fc(self.conv(x).mean(1, keepdim=True).expand(-1, 4, -1, -1).flatten(1))

    model = NoPool()
    record(model, recipe=history(student).recipe)
    with pytest.raises(SurgeryError, match=r"no global pooling over the spatial axes found in NoPool \(looked for "):
        finetune(model, model, synthetic(), objective="features", progress=False)
    with pytest.raises(SurgeryError, match="has no recipe"):
        finetune(teacher, teacher, synthetic(), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact = convert(teacher, "v1.5", exact=True, input_size=(3, 16, 16))
    with pytest.raises(SurgeryError, match="exact"):
        finetune(exact, teacher, synthetic(), progress=False)
