"""What recovery and inference cost on a GPU (run once on a lent H200; the README quotes the result).

    python benchmarks/bench_gpu.py --imagenet DIR --cifar-test TAR [--quick] [--out gpu.json]

1. ResNet-50 at 224x224, v1.5 -> v1 (random weights with BatchNorm statistics and affines randomised so its
   activations look like a trained network's): the default ``calibrate`` on 1,024 random crops of the given
   ImageNet images, with wall seconds per step; feature mimicking (``finetune(objective="features")``),
   seconds per step; agreement with the original on 256 held-out crops.
2. The committed CIFAR-10 model, v1.5 -> v1: default calibration on 2,048 images of the first half of the
   test set, one fine-tuning epoch (logits, labels) on that half, top-1 on the other half; wall seconds.
3. Latency: onnxruntime's CUDA execution provider (the `bench --device cuda` path) when this onnxruntime has
   it; PyTorch CUDA eager latency (fp32, CUDA events, median of 100 runs) of v1.5, v1, d and pruned v1 at
   batch 1 and 64 either way.
Writes one JSON file (machine, versions, every figure).
"""

from __future__ import annotations

import argparse
import json
import platform
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset, TensorDataset
from torchvision import transforms

import resnet_surgery as rs
from resnet_surgery.data import normalize_uint8

warnings.simplefilter("ignore", rs.SurgeryNotice)  # the conversions here are approximate on purpose


class Crops(Dataset):
    """``count`` seeded random-resized crops (224, flipped half the time) of a few photos, normalised."""

    def __init__(self, folder: Path, count: int, seed: int):
        self.images = [Image.open(p).convert("RGB") for p in sorted(folder.iterdir()) if p.suffix.lower() == ".jpeg"]
        self.count, self.seed = count, seed
        norm = transforms.Normalize(rs.data.IMAGENET_MEAN, rs.data.IMAGENET_STD)
        self.transform = transforms.Compose([transforms.RandomResizedCrop(224, scale=(0.2, 1.0)),
                                             transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm])

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> torch.Tensor:
        torch.manual_seed(self.seed * 1_000_003 + i)
        return self.transform(self.images[i % len(self.images)])


def randomize_bn(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """BatchNorm statistics and affines of realistic spread, so activations look like a trained network's."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


def resnet50_recovery(imagenet: Path, device: torch.device, quick: bool) -> dict:
    original = randomize_bn(torchvision.models.resnet50()).to(device)
    v1 = rs.convert(original, "v1")
    n, held, steps = (64, 32, 10) if quick else (1024, 256, 200)
    calib, test = Crops(imagenet, n, seed=0), Crops(imagenet, held, seed=1)
    reference = rs.predict(original, test, batch_size=64, progress=False)
    out = {"images": n, "held_out": held}
    quick_iterations = {"iterations": 5} if quick else {}  # a CPU check of the script, not a measurement
    for label, kwargs in (("bn", {"steps": ("bn",)}), ("default", quick_iterations)):
        model, seconds = timed(lambda kw=kwargs: rs.calibrate(v1, original, calib, num_images=n, progress=False, **kw))
        report = rs.history(model).calibration
        agreement = rs.evaluate(model, test, reference=reference, batch_size=64, progress=False).agreement
        out[f"calibrate_{label}"] = {"wall_seconds": round(seconds, 1), "agreement_held_out": agreement,
                                     "report": report.to_dict()}
    calibrated = model
    tuned, seconds = timed(lambda: rs.finetune(calibrated, original, calib, objective="features", steps=steps,
                                               augment="none", batch_size=64, progress=False))
    out["features"] = {"steps": steps, "batch": 64, "wall_seconds": round(seconds, 1),
                       "seconds_per_step": round(seconds / steps, 4),
                       "agreement_held_out": rs.evaluate(tuned, test, reference=reference, batch_size=64,
                                                         progress=False).agreement}
    return out


def cifar_recovery(cifar_test: Path, device: torch.device, quick: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(cifar_test) as tar:
            tar.extractall(tmp, filter="data")
        images, labels = _read_cifar(Path(tmp))
    x = normalize_uint8(images)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    half = len(x) // 2
    train = TensorDataset(x[order[:half]], labels[order[:half]])
    test = TensorDataset(x[order[half:]], labels[order[half:]])
    if quick:
        train = torch.utils.data.Subset(train, range(512))
        test = torch.utils.data.Subset(test, range(512))
    original = rs.load_model("cifar10-resnet-v1.5", "DEFAULT").to(device)
    v1 = rs.convert(original, "v1", input_size=32)
    out = {"train_images": len(train), "test_images": len(test),
           "original_top1": rs.evaluate(original, test, progress=False).top1,
           "naive_top1": rs.evaluate(v1, test, progress=False).top1}
    calibrated, seconds = timed(lambda: rs.calibrate(v1, original, train, num_images=2048, progress=False,
                                                     **({"iterations": 5} if quick else {})))
    out["calibrate"] = {"wall_seconds": round(seconds, 1), "top1": rs.evaluate(calibrated, test, progress=False).top1}
    tuned, seconds = timed(lambda: rs.finetune(calibrated, original, train, epochs=1, progress=False))
    out["finetune_1_epoch"] = {"wall_seconds": round(seconds, 1), "top1": rs.evaluate(tuned, test, progress=False).top1}
    return out


def _read_cifar(root: Path):
    """(uint8 images [N, 3, 32, 32], labels) of an extracted test/<class>/*.jpg tree, classes sorted."""
    folder = next(p for p in root.rglob("test") if p.is_dir())
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            images.append(torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def torch_latency(device: torch.device, quick: bool) -> dict:
    base = randomize_bn(torchvision.models.resnet50())
    v1 = rs.convert(base, "v1")
    models = {"v1.5": base, "v1": v1, "d": rs.convert(base, "d"), "v1-pruned": rs.convert(v1, prune_dead=True)}
    runs = 10 if quick else 100
    out = {}
    for batch in (1, 64):
        x = torch.randn(batch, 3, 224, 224, device=device)
        for name, model in models.items():
            model = model.to(device).eval()
            times = []
            with torch.no_grad():
                for i in range(runs + 10):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    model(x)
                    end.record()
                    torch.cuda.synchronize()
                    if i >= 10:  # warm-up
                        times.append(start.elapsed_time(end))
            times.sort()
            out[f"{name} b{batch}"] = {"p50_ms": round(times[len(times) // 2], 3), "p90_ms": round(times[int(len(times) * 0.9)], 3)}
    return out


def onnxruntime_cuda(tmp: Path, quick: bool) -> dict:
    import onnxruntime as ort

    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return {"available": False, "providers": providers,
                "why": "this onnxruntime has no CUDA execution provider (onnxruntime-gpu is not installed)"}
    base = randomize_bn(torchvision.models.resnet50())
    paths = {}
    for name, model in (("v1.5", base), ("v1", rs.convert(base, "v1"))):
        paths[name] = tmp / f"{name}.onnx"
        rs.export_onnx(model, paths[name])
    report = rs.compare_latency(paths, batch_sizes=(1, 64), device="cuda", min_time_s=1 if quick else 5,
                                max_time_s=3 if quick else 15, progress=False)
    return {"available": True, "providers": providers, "report": report.to_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imagenet", type=Path, required=True)
    parser.add_argument("--cifar-test", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="tiny settings: check the script runs")
    parser.add_argument("--out", type=Path, default=Path("gpu.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"machine": {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
                          "torch": torch.__version__, "torchvision": torchvision.__version__,
                          "python": platform.python_version()}}
    for name, step in (("resnet50_recovery", lambda: resnet50_recovery(args.imagenet, device, args.quick)),
                       ("cifar_recovery", lambda: cifar_recovery(args.cifar_test, device, args.quick)),
                       ("torch_cuda_latency", lambda: torch_latency(device, args.quick) if device.type == "cuda" else None)):
        start = time.perf_counter()
        try:
            result[name] = step()
        except Exception as e:  # keep what the other parts measured
            result[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result["onnxruntime_cuda"] = onnxruntime_cuda(Path(tmp), args.quick)
        except Exception as e:
            result["onnxruntime_cuda"] = {"error": f"{type(e).__name__}: {e}"}
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, indent=1, default=str)[:6000])


if __name__ == "__main__":
    main()
