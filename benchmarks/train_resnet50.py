"""Train the ResNet-50 that recovery is judged by, on CIFAR-10 upsampled (one command, reproducible).

    python benchmarks/train_resnet50.py --device cuda --arch resnet50 --size 160 --epochs 18   # on a GPU
    python benchmarks/train_resnet50.py --threads 1                                          # the CPU stand-in

``--arch resnet50`` is torchvision's ``resnet50`` unmodified (its v1.5 layout, the head resized to 10 classes).
A CPU session cannot train that (an epoch at 128 px is hours on two cores), so ``--arch standin`` (the
default) is the largest faithful stand-in one can: ResNet-50's depth and layout (torchvision's 7x7/2 stem and
max-pool, Bottleneck blocks [3, 4, 6, 3], the same module names) at a quarter of the width (bottleneck widths
16/32/64/128, outputs 64..512) on 64 px inputs, so every stage's map is as a 224 px ResNet-50's divided by 3.5
(16, 8, 4, 2).

The images are the CIFAR-10 JPEGs of ../shared/data decoded once to uint8; each batch is cropped (4-pixel
padding) and flipped at 32 px, then upsampled bilinearly to ``--size`` (as the model's transform, the cifar10
preset at that size, does for a folder of images). Writes the weights as fp16 safetensors (the architecture
and input size in its metadata) to weights/cifar10-resnet50.safetensors, after every epoch, and
benchmarks/results/train_resnet50.json (settings, per-epoch test top-1, time, device, CPU flags, sha256).
"""

from __future__ import annotations

import argparse
import hashlib
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
from resnet_surgery.deploy.cpu import cpu_extensions
from resnet_surgery.zoo.judge import JUDGE_FILE, STANDIN, build_judge

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_cifar import augment, param_groups  # noqa: E402  (the CIFAR models' augmentation and decay groups)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results" / "train_resnet50.json"


def to_input(images: torch.Tensor, size: int, device) -> torch.Tensor:
    """uint8 32x32 batch -> normalised float at ``size`` (bilinear, as the cifar10 preset's Resize does)."""
    x = normalize_uint8(images).to(device)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def evaluate(model, images, labels, size: int, device, batch_size: int = 500, bf16: bool = False) -> float:
    """Top-1 (%) on uint8 images."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(to_input(images[i : i + batch_size], size, device))
        correct += (logits.argmax(1).cpu() == labels[i : i + batch_size]).sum().item()
    return 100.0 * correct / len(images)


def save_weights(model, args, top1: float, epoch: int) -> str:
    """fp16 safetensors with the architecture in the metadata; returns its sha256."""
    state = {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous().cpu()
             for k, v in model.state_dict().items()}
    meta = {"arch": args.arch, "input_size": str(args.size), "num_classes": "10", "epochs": str(epoch),
            "cifar10_test_top1": f"{top1:.2f}", **({"widths": json.dumps(STANDIN["widths"]),
                                                   "blocks": json.dumps(STANDIN["blocks"])}
                                                  if args.arch == "standin" else {})}
    with atomic_file(args.out, force=True) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return hashlib.sha256(args.out.read_bytes()).hexdigest()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["standin", "resnet50"], default="standin")
    p.add_argument("--size", type=int, default=None, help="input side in pixels (default: 64 standin, 160 resnet50)")
    p.add_argument("--epochs", type=int, default=22)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.2, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--warmup", type=float, default=0.2)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (a GPU, or a CPU with AVX-512 BF16/AMX)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=SHARED)
    p.add_argument("--out", type=Path, default=JUDGE_FILE)
    p.add_argument("--results", type=Path, default=RESULTS, help="the JSON record of the run")
    p.add_argument("--train-images", type=int, default=None, help="train on the first N images only (a smoke test)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    args = p.parse_args(argv)
    args.size = args.size or (64 if args.arch == "standin" else 160)
    if args.out.exists() and not args.force:
        raise SystemExit(f"error: {args.out} exists; pass --force to retrain and overwrite it")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    train, test = cifar10_tensors(args.data, "train"), cifar10_tensors(args.data, "test")
    if args.train_images:
        train, test = (train[0][: args.train_images], train[1][: args.train_images]), (test[0][:500], test[1][:500])
    model = build_judge(args.arch).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(param_groups(model, args.weight_decay), lr=args.lr, momentum=0.9, nesterov=True)
    images, labels = train
    steps = len(images) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps,
                                                pct_start=args.warmup)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("force", "results")}
    print(f"torch {torch.__version__}, {device}, {args.threads} threads, {settings}", flush=True)
    history, start, cpu0 = [], time.time(), time.process_time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(len(images), generator=gen)
        total = 0.0
        for step in tqdm(range(steps), desc=f"epoch {epoch}/{args.epochs}", leave=False, disable=not sys.stderr.isatty()):
            idx = perm[step * args.batch_size : (step + 1) * args.batch_size]
            x = to_input(augment(images[idx], gen), args.size, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                loss = F.cross_entropy(model(x), labels[idx].to(device), label_smoothing=args.label_smoothing)
            if not torch.isfinite(loss):
                raise SystemExit(f"non-finite loss at epoch {epoch} step {step}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        top1 = evaluate(model, *test, args.size, device, bf16=args.bf16)
        sha = save_weights(model, args, top1, epoch)
        history.append({"epoch": epoch, "train_loss": round(total / steps, 4), "test_top1": round(top1, 2),
                        "wall_s": round(time.time() - start, 1), "cpu_s": round(time.process_time() - cpu0, 1)})
        print(f"epoch {epoch:3d}/{args.epochs}  loss {total / steps:.4f}  test top-1 {top1:6.2f}%  "
              f"{time.time() - start:7.0f}s", flush=True)
        result = {"benchmark": "train_resnet50", "arch": args.arch, "settings": settings,
                  "dataset": "CIFAR-10 JPEG (../shared/data/cifar10), full test set", "test_top1": round(top1, 2),
                  "epochs_done": epoch, "wall_s": history[-1]["wall_s"], "cpu_s": history[-1]["cpu_s"],
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                  "cpu_flags": cpu_extensions(), "torch": torch.__version__, "platform": platform.platform(),
                  "weights": str(args.out.resolve().relative_to(REPO)) if args.out.resolve().is_relative_to(REPO)
                  else str(args.out), "sha256": sha, "bytes": args.out.stat().st_size, "history": history}
        with atomic_file(args.results, force=True) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
