"""Which variant of a trained model should I deploy? `explore` answers with one table and one chart.

Needs the CIFAR-10 copy in ../shared/data (beside the repository) or a path given as the first argument.
Writes runs/explore-example/ (explore.json, explore.png, candidates/); run it again and every finished
candidate is reused.
"""

import sys
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import resnet_surgery as rs
from resnet_surgery.data import normalize_uint8

shared = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[3] / "shared" / "data"
train, _ = rs.cifar10_tensors(shared, "train")
test, test_labels = rs.cifar10_tensors(shared, "test")
g = torch.Generator().manual_seed(0)
unlabelled = TensorDataset(normalize_uint8(train[torch.randperm(len(train), generator=g)[:4096]]))
some = torch.randperm(len(test), generator=g)[:2000]  # the files are sorted by class: a random subset
held_out = TensorDataset(normalize_uint8(test[some]), test_labels[some])

report = rs.explore(
    rs.load_cifar_resnet("v1.5"),
    unlabelled,  # calibration (and int8 calibration) needs no labels
    eval_data=held_out,  # labelled, disjoint from the calibration images: top-1 is measured here
    input_size=(3, 32, 32),
    batch_sizes=(1, 8),
    min_time_s=2.0,
    out="runs/explore-example",
)
print(report)
best = [c.name for c in report.timed() if c.pareto["1"]]
print(f"on the Pareto front at batch 1: {', '.join(best)}; chart: runs/explore-example/explore.png")
