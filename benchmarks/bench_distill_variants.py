"""Why feature mimicking and fine-tuning did nothing for v1.5 -> v1 on the trained ResNet-50: variants after
the same calibration.

    python benchmarks/bench_distill_variants.py [--variants NAME ...]

On the trained ResNet-50 stand-in (`train_resnet50.py`), `recover` and `bench_cost` saw fine-tuning's guard
return its input after feature mimicking (the feature error on 256 training images rose) and, in `recover`,
after fine-tuning too. Each variant here starts from the same default calibration (2,048 training images)
and trains with `finetune`; the guard's verdict is recorded but not obeyed (``guard=False``), so that the
test top-1 shows whether the guard's measure or the training was wrong:
- "features": feature mimicking as recover runs it (500 steps on the calibration images, augmented);
- "features lr/3", "features no augment": the same at a third of the rate, and without augmentation;
- "both": fine-tuning as recover runs it (logits + features + 0.1 cross-entropy, a quarter of a pass over the
  labelled training images).
Top-1 on the whole CIFAR-10 test set, CPU seconds of each run on one thread. Writes
benchmarks/results/distill-variants.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from resnet_surgery.atomic import atomic_file
from resnet_surgery.data import cifar10_tensors, normalize_uint8
from resnet_surgery.deploy.cpu import cpu_extensions
from resnet_surgery.engine.rewrite import convert
from resnet_surgery.history import history
from resnet_surgery.recovery.calibrate import calibrate
from resnet_surgery.recovery.evaluate import evaluate
from resnet_surgery.recovery.finetune import finetune
from resnet_surgery.zoo.judge import load_judge

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
OUT = REPO / "benchmarks" / "results" / "distill-variants.json"

# name -> (labelled training images?, finetune's options)
VARIANTS = {
    "features": (False, {"objective": "features", "steps": 500, "augment": "auto"}),
    "features lr/3": (False, {"objective": "features", "steps": 500, "augment": "auto", "lr": 1e-4}),
    "features no augment": (False, {"objective": "features", "steps": 500, "augment": "none"}),
    "both": (True, {"objective": "both", "steps": 195, "augment": "auto", "alpha": 0.9}),
}


def main(argv=None) -> None:
    from bench_cost import resized, subset  # the same images as bench_cost.py's ResNet-50 runs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calib-images", type=int, default=2048)
    p.add_argument("--data", type=Path, default=SHARED)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    original = load_judge()
    size = original.input_size
    prepare = lambda x: resized(normalize_uint8(x), size)  # noqa: E731
    test_images, test_labels = cifar10_tensors(args.data, "test")
    test = TensorDataset(prepare(test_images), test_labels)
    train_images, train_labels = cifar10_tensors(args.data, "train")
    calib_images, _ = subset(train_images, train_labels, args.calib_images, 0)
    calib = TensorDataset(prepare(calib_images))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert(original, "v1", input_size=(3, size, size))
    cpu = time.process_time()
    calibrated = calibrate(converted, original, calib, num_images=None, batch_size=128, progress=False)
    result = {"model": "cifar10-resnet50", "rewrite": "v1.5 -> v1",
              "original": evaluate(original, test, batch_size=500, progress=False).top1,
              "calibrated": evaluate(calibrated, test, batch_size=500, progress=False).top1,
              "calibration_cpu_s": round(time.process_time() - cpu, 1), "variants": {},
              "machine": {"cpu_flags": cpu_extensions(), "torch": torch.__version__, "threads": args.threads,
                          "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}}
    print(json.dumps({k: v for k, v in result.items() if k != "variants"}), flush=True)
    train = None
    for name in args.variants:
        labelled, options = VARIANTS[name]
        if labelled and train is None:
            train = TensorDataset(prepare(train_images), train_labels)
        cpu = time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = finetune(calibrated, original, train if labelled else calib, batch_size=64, seed=0,
                             channels_last=True, guard=False, progress=False, **options)
        report = history(model).finetune
        row = {"top1": evaluate(model, test, batch_size=500, progress=False).top1, "steps": report.steps,
               "cpu_s": round(time.process_time() - cpu, 1), "guard_error_before": report.error_before,
               "guard_error_after": report.error_after, "guard_would_keep": report.error_after <= report.error_before}
        result["variants"][name] = row
        print(name, json.dumps(row), flush=True)
        with atomic_file(args.out, force=True) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
