"""Block reconstruction before and after the guard (issue 19): old default vs new, per block and on unseen images.

    python benchmarks/bench_recovery_guard.py cifar --to v1 --images 1024 --iterations 300
    python benchmarks/bench_recovery_guard.py resnet50 --to v1 --iterations 15

"old" is the previous default, emulated in this process: Adam at an absolute 1e-3, every cached image trained
on, the last iterate kept. "new" is the code as it is: Adam at ``--lr`` relative to each tensor's RMS, 1/8 of
the images held back, the best iterate kept (or the block as it was). Both start from the same BatchNorm
re-estimation; agreement and top-1 are measured on images no step saw. One JSON line per run goes to
benchmarks/results/recovery-guard.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import resnet_surgery.recovery.reconstruct as reconstruct
from resnet_surgery.data import cifar10_tensors, normalize_uint8
from resnet_surgery.engine.rewrite import convert
from resnet_surgery.history import history
from resnet_surgery.recovery.calibrate import calibrate
from resnet_surgery.recovery.evaluate import evaluate
from resnet_surgery.store import load_model

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
OUT = REPO / "benchmarks" / "results" / "recovery-guard.jsonl"


def cifar_setup(args):
    original = load_model("cifar10-resnet-v1.5", "DEFAULT").eval()
    train, _ = cifar10_tensors(SHARED, "train")
    test, labels = cifar10_tensors(SHARED, "test")
    g = torch.Generator().manual_seed(0)
    calib = normalize_uint8(train[torch.randperm(len(train), generator=g)[: args.images]])
    held = torch.randperm(len(test), generator=g)[: args.test_images]
    return original, 32, TensorDataset(calib), TensorDataset(normalize_uint8(test[held]), labels[held])


def crops(paths, per_image: int, seed: int) -> torch.Tensor:
    """``per_image`` random resized 224 crops (and flips) of each photo, ImageNet-normalised."""
    from PIL import Image
    from torchvision.transforms import v2

    torch.manual_seed(seed)
    t = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(224, scale=(0.1, 1.0), antialias=True),
                    v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                    v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    return torch.stack([t(Image.open(p).convert("RGB")) for p in paths for _ in range(per_image)])


def trained_like(model, images: torch.Tensor, seed: int):
    """Random BatchNorm affines (a residual branch's last norm smaller, as training leaves it) and statistics
    measured on ``images``, so every layer's activations are standardised like a trained network's."""
    g = torch.Generator().manual_seed(seed)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            low, high = (0.1, 0.5) if name.endswith("bn3") else (0.5, 1.2)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) * (high - low) + low)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for batch in images.split(16):
            model(batch)
    return model.eval()


def resnet50_setup(args):
    import torchvision

    torch.manual_seed(args.seed)
    photos = sorted((SHARED / "imagenet-val").glob("*.JPEG"))
    calib = crops(photos[:7], args.images // 7, seed=1)
    test = crops(photos[7:], args.test_images // 3, seed=2)
    original = trained_like(torchvision.models.resnet50(), calib[:32], args.seed)
    return original, 224, TensorDataset(calib), TensorDataset(test)


class OldReconstruction:
    """The previous default inside this process: absolute rate, all images trained on, the last iterate kept."""

    def __enter__(self):
        self.saved = reconstruct._relative_groups, reconstruct.held_back, reconstruct._Best.offer
        reconstruct._relative_groups = lambda params, lr: [{"params": params, "lr": lr}]
        reconstruct.held_back = lambda n, seed: (torch.arange(n), torch.arange(n))

        def take(best, error, iteration, params):
            best.error, best.iteration, best.values = error, iteration, [p.detach().clone() for p in params]

        reconstruct._Best.offer = take
        return self

    def __exit__(self, *exc):
        reconstruct._relative_groups, reconstruct.held_back, reconstruct._Best.offer = self.saved


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    original, size, calib, test = (cifar_setup if args.model == "cifar" else resnet50_setup)(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert(original, args.to, input_size=size)
    kw = dict(num_images=None, batch_size=args.batch_size, iterations=args.iterations, seed=args.seed, progress=False)
    ev = lambda m: evaluate(m, test, reference=original, batch_size=100, progress=False)  # noqa: E731
    result = {"model": args.model, "rewrite": f"v1.5 -> {args.to}", "commit": args.commit, "images": len(calib), "test_images": len(test),
              "iterations": args.iterations, "new_lr": args.lr, "after": args.after, "bf16": args.bf16,
              "channels_last": args.channels_last, "threads": args.threads, "rows": {}}
    start = time.process_time()
    bn = calibrate(converted, original, calib, steps=("bn",), **kw)
    result["rows"]["bn"] = {"eval": ev(bn).to_dict(), "cpu_seconds": time.process_time() - start}
    for name, lr in [(n, lr) for n, lr in (("old", 1e-3), ("new", args.lr)) if n in args.rows.split(",")]:
        start = time.process_time()
        if name == "old":
            with OldReconstruction():
                model = calibrate(bn, original, calib, steps=("reconstruct",), lr=lr, **kw)
        else:
            model = calibrate(bn, original, calib, steps=("reconstruct",), lr=lr, after=args.after, bf16=args.bf16,
                              channels_last=args.channels_last, **kw)
        blocks = [{k: getattr(b, k) for k in ("block", "previous", "following", "error_before", "error_after", "kept",
                                              "held_out", "back_offs", "cpu_seconds")}
                  for b in history(model).calibration.blocks]
        result["rows"][name] = {"lr": lr, "eval": ev(model).to_dict(), "blocks": blocks,
                                "cpu_seconds": time.process_time() - start}
        print(name, json.dumps(result["rows"][name]), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=("cifar", "resnet50"))
    p.add_argument("--to", default="v1", choices=("v1", "d"))
    p.add_argument("--images", type=int, default=56, help="calibration images (ResNet-50: crops of 7 photos)")
    p.add_argument("--test-images", type=int, default=48, help="unseen images (ResNet-50: crops of 3 other photos)")
    p.add_argument("--iterations", type=int, default=15)
    p.add_argument("--lr", type=float, default=reconstruct.RECONSTRUCT_LR, help="the new, relative rate")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--commit", default="", help="recorded with the result")
    p.add_argument("--after", type=int, default=0, help="new: blocks after each rewritten one trained with it")
    p.add_argument("--bf16", action="store_true", help="new: reconstruct under bfloat16 autocast")
    p.add_argument("--channels-last", action="store_true", help="new: reconstruct in channels-last memory format")
    p.add_argument("--rows", default="old,new", help="which reconstructions to run besides BatchNorm alone")
    args = p.parse_args()
    result = run(args)
    flags = sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f in ("avx2", "avx512_vnni", "avx512_bf16", "amx_tile")})
    result["cpu_flags"] = flags
    with OUT.open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))


if __name__ == "__main__":
    main()
