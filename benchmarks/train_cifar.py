"""Train the committed CIFAR-10 models (one v1, one v1.5 Bottleneck ResNet) on a small CPU.

    python benchmarks/train_cifar.py --force            # both layouts, v1.5 first (10 epochs, batch 512)
    python benchmarks/train_cifar.py --force --resume --epochs 4 --batch-size 128 --lr 0.08 --warmup 0.15
    python benchmarks/train_cifar.py --force --resume --epochs 10 --batch-size 128 --lr 0.1 --warmup 0.15
    python benchmarks/train_cifar.py --force --resume --layouts v1 --epochs 4 --batch-size 128 --lr 0.03 --warmup 0.1

The committed weights are those cycles (24 epochs for v1.5, 28 for v1, each layout in its own process with
--threads 1, the last v1 cycle with --threads 2): 85.06% (v1.5) and 85.09% (v1) on the CIFAR-10 test set.

Writes resnet_surgery/weights/cifar10_resnet_{v1_5,v1}.safetensors and benchmarks/results/train_cifar.json
(test top-1 per epoch, wall time, hyper-parameters, torch version). Speed on 2 cores comes from decoding
the JPEGs once to uint8 tensors, augmenting whole batches as tensors, channels_last and bfloat16 autocast.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from resnet_surgery.atomic import atomic_file
from resnet_surgery.data import cifar10_tensors, normalize_uint8
from resnet_surgery.zoo.cifar import (
    DEFAULT_BLOCKS,
    DEFAULT_STEM_WIDTH,
    DEFAULT_WIDTHS,
    cifar_resnet,
    weights_path,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results" / "train_cifar.json"


def augment(images: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with ``pad``-pixel zero padding and random horizontal flip, on a uint8 batch."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def to_input(images: torch.Tensor) -> torch.Tensor:
    return normalize_uint8(images).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def evaluate(model, images, labels, batch_size: int = 1000, bf16: bool = False) -> float:
    """Top-1 (%) on uint8 images; bf16 for the cheap per-epoch check, fp32 for the reported number."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(to_input(images[i : i + batch_size]))
        correct += (logits.argmax(1) == labels[i : i + batch_size]).sum().item()
    return 100.0 * correct / len(images)


def param_groups(model, weight_decay: float):
    # No weight decay on BatchNorm parameters and biases (the usual choice; they are not scale-free weights).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_one(layout: str, args, train, test) -> dict:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = cifar_resnet(layout, widths=args.widths, blocks=args.blocks, stem_width=args.stem_width)
    cycles = []
    if args.resume:
        # Another one-cycle run on top of the committed weights (a further cycle when the last fell short).
        from safetensors.torch import load_file

        model.load_state_dict(load_file(weights_path(layout)))
        saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        cycles = previous_cycles(saved.get("runs", {}).get(layout, {}), saved.get("hyper_parameters"))
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(param_groups(model, args.weight_decay), lr=args.lr, momentum=0.9, nesterov=True)
    images, labels = train
    steps_per_epoch = len(images) // args.batch_size  # drop the last partial batch: equal-size batches
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch, pct_start=args.warmup
    )
    history = []
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(images), generator=gen)
        total, seen = 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"{layout} epoch {epoch + 1}/{args.epochs}", leave=False,
                   disable=not sys.stderr.isatty())
        for step in bar:
            idx = perm[step * args.batch_size : (step + 1) * args.batch_size]
            x = to_input(augment(images[idx], gen))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss = F.cross_entropy(model(x), labels[idx], label_smoothing=args.label_smoothing)
            if not torch.isfinite(loss):
                raise SystemExit(f"non-finite loss at {layout} epoch {epoch + 1} step {step}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        top1 = evaluate(model, *test, bf16=args.bf16)
        elapsed = time.time() - start
        history.append({"epoch": epoch + 1, "train_loss": round(total / seen, 4), "test_top1": round(top1, 2),
                        "elapsed_s": round(elapsed, 1)})
        print(f"{layout:5s} epoch {epoch + 1:3d}/{args.epochs}  loss {total / seen:.4f}  test top-1 {top1:6.2f}%"
              f"  {elapsed:7.1f}s", flush=True)
    wall = time.time() - start
    top1 = evaluate(model, *test, bf16=False)
    print(f"{layout:5s} final fp32 test top-1 {top1:.2f}%  wall {wall:.0f}s", flush=True)
    save_weights(model, layout, args, top1)
    cycles.append({"epochs": args.epochs, "wall_s": round(wall, 1), "test_top1": round(top1, 2), "history": history,
                   "hyper_parameters": hyper_parameters(args)})
    return {"layout": layout, "test_top1": round(top1, 2), "test_images": len(test[0]),
            "epochs": sum(c["epochs"] for c in cycles), "wall_s": round(sum(c["wall_s"] for c in cycles), 1),
            "cycles": cycles, "weights": str(weights_path(layout).relative_to(REPO))}


def previous_cycles(old: dict, default_hyper: dict | None) -> list[dict]:
    """The training cycles recorded for a layout (also reads the older one-record-per-run format)."""
    if not old or "cycles" in old:
        return list(old.get("cycles", []))
    prev = old.get("previous_cycle")
    this = {k: old.get(k) for k in ("epochs", "wall_s", "test_top1", "history")}
    this["hyper_parameters"] = old.get("hyper_parameters") or default_hyper
    if not prev:
        return [this]
    prev = {**prev, "hyper_parameters": prev.get("hyper_parameters") or default_hyper}
    this.update(epochs=this["hyper_parameters"]["epochs"], wall_s=round(old["wall_s"] - prev["wall_s"], 1))
    return [prev, this]


def hyper_parameters(args) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("layouts", "force")}


def save_weights(model, layout: str, args, top1: float) -> None:
    # Plain contiguous tensors, so the file does not depend on channels_last; the architecture rides along as metadata.
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"layout": layout, "widths": json.dumps(list(args.widths)), "blocks": json.dumps(list(args.blocks)),
            "stem_width": str(args.stem_width), "num_classes": "10", "cifar10_test_top1": f"{top1:.2f}"}
    path = weights_path(layout)
    with atomic_file(path, force=args.force) as tmp:
        save_file(state, str(tmp), metadata=meta)


def write_results(runs: dict, args) -> None:
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    runs = {**old.get("runs", {}), **runs}
    result = {"benchmark": "train_cifar", "dataset": "CIFAR-10 JPEG (../shared/data/cifar10), full test set",
              "hyper_parameters": hyper_parameters(args), "torch": torch.__version__, "platform": platform.platform(),
              "threads": torch.get_num_threads(), "runs": runs}
    with atomic_file(RESULTS, force=True) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", nargs="+", default=["v1.5", "v1"], choices=["v1", "v1.5"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.4, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--warmup", type=float, default=0.2, help="fraction of steps rising to the peak lr")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--widths", type=int, nargs="+", default=list(DEFAULT_WIDTHS))
    p.add_argument("--blocks", type=int, nargs="+", default=list(DEFAULT_BLOCKS))
    p.add_argument("--stem-width", type=int, default=DEFAULT_STEM_WIDTH)
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in float32 (about 3x slower)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-images", type=int, default=None, help="use only the first N (shuffled) images")
    p.add_argument("--data", type=Path, default=SHARED, help="shared data folder holding cifar10/{train,test}.tar")
    p.add_argument("--force", action="store_true", help="overwrite the committed weights")
    p.add_argument("--resume", action="store_true", help="start from the committed weights (a further cycle)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for layout in args.layouts:
        if weights_path(layout).exists() and not args.force:
            raise SystemExit(f"error: {weights_path(layout)} exists; pass --force to retrain and overwrite it")
    train = cifar10_tensors(args.data, "train")
    if args.train_images:
        keep = torch.randperm(len(train[0]), generator=torch.Generator().manual_seed(args.seed))[: args.train_images]
        train = (train[0][keep], train[1][keep])
    test = cifar10_tensors(args.data, "test")
    print(f"torch {torch.__version__}, {args.threads} threads, train {tuple(train[0].shape)}, "
          f"test {tuple(test[0].shape)}, {vars(args)}", flush=True)
    for layout in args.layouts:
        run = train_one(layout, args, train, test)
        write_results({layout: run}, args)  # after each layout, so a later failure keeps the earlier result


if __name__ == "__main__":
    main()
