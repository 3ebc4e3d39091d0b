"""What fine-tuning minimises: knowledge distillation of the logits, mimicking of the feature map before
global pooling (kept by a node inserted before the reduction, whatever its form), and the augmentation that varies a small set's images."""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..data import split_batch
from ..engine import GlobalPool, find_global_pool, trace
from ..utils import model_device

__all__ = ["AUGMENTATIONS", "AUTO_CIFAR_SIZE", "Taps", "augmenter", "distillation_loss", "features_text", "global_pools",
           "feature_loss", "global_pool", "training_loss"]

AUGMENTATIONS = ("none", "auto", "cifar", "imagenet")
AUTO_CIFAR_SIZE = 64  # "auto" augments images up to this size like CIFAR (pad-crop), larger ones like ImageNet


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the softmax at ``temperature``, times T^2 so gradients keep their scale.

    Args:
        student_logits: N x classes.
        teacher_logits: N x classes.
        temperature: the softmax temperature T.

    Returns:
        Tensor: the loss (a scalar), averaged over the batch.
    """
    t = temperature
    log_s = F.log_softmax(student_logits / t, dim=1)
    log_t = F.log_softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * t * t



def feature_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """MSE between feature maps relative to the teacher's mean square, so one learning rate suits every model.

    Args:
        student_features: the student's feature map.
        teacher_features: the teacher's, of the same shape.

    Returns:
        Tensor: the loss (a scalar).
    """
    return F.mse_loss(student_features, teacher_features) / teacher_features.pow(2).mean().clamp_min(1e-12)



def global_pool(model: nn.Module, example: torch.Tensor | None = None) -> GlobalPool:
    """The global spatial reduction that ends the trunk, found in the fx graph whatever its form; its input is
    the feature map that objective="features" matches.

    Args:
        model: a model that ends in global pooling and a classifier.
        example: an input batch, to recognise pooling with a fixed kernel the size of the map.

    Returns:
        GlobalPool: the reduction, its feature node and the modules with parameters after it.
    """
    return find_global_pool(model, example)


class _Keep(nn.Module):
    """Passes its input through and keeps it: the feature map, caught inside the traced graph."""

    def __init__(self):
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.value = x
        return x


def _tap(model: nn.Module, pool: GlobalPool) -> tuple[nn.Module, _Keep]:
    """Make the traced part of ``model`` that holds ``pool`` run a copy of its graph that keeps the pool's input:
    (the part whose forward was replaced, the keeper). The copy calls the part's own modules."""
    part = model.get_submodule(pool.trunk) if pool.trunk else model
    gm = trace(part)
    graph = copy.deepcopy(gm.graph)  # a GraphModule's own graph stays as it is
    nodes = {n.name: n for n in graph.nodes}
    keep = _Keep()
    gm.add_submodule("feature_tap", keep)
    with graph.inserting_after(nodes[pool.feature]):
        kept = graph.call_module("feature_tap", (nodes[pool.feature],))
    nodes[pool.node].replace_input_with(nodes[pool.feature], kept)
    tapped = fx.GraphModule(gm, graph, type(part).__name__)
    part.forward = tapped.forward  # an instance attribute: Taps.remove deletes it
    return part, keep


@dataclasses.dataclass
class Taps:
    """The pre-pool feature maps of the student and the teacher, kept by a node inserted after each model's
    feature node (a copy of its traced graph runs in place of its forward while attached).

    Args:
        pools: the student's and the teacher's global pools.
        parts: the modules whose forward runs the tapped graph.
        keepers: the student's and the teacher's keepers.
    """

    pools: list = dataclasses.field(default_factory=list)
    parts: list = dataclasses.field(default_factory=list)
    keepers: list = dataclasses.field(default_factory=list)

    @property
    def student(self) -> torch.Tensor | None:
        """The student's last feature map."""
        return self.keepers[0].value if self.keepers else None

    @property
    def teacher(self) -> torch.Tensor | None:
        """The teacher's last feature map."""
        return self.keepers[1].value if self.keepers else None

    def attach(self, student: nn.Module, teacher: nn.Module, pools: tuple[GlobalPool, GlobalPool]) -> None:
        """Keep the input of the global pool ``pools`` (the student's, the teacher's) from every forward."""
        self.pools = list(pools)
        for model, pool in zip((student, teacher), pools):
            part, keep = _tap(model, pool)
            self.parts.append(part)
            self.keepers.append(keep)

    def remove(self) -> None:
        """Give both models their own forward back."""
        for part in self.parts:
            part.__dict__.pop("forward", None)
        self.parts, self.keepers = [], []



def training_loss(objective, logits, teacher_logits, taps: Taps, labels, *, temperature, alpha):
    """The loss of one batch: KL of the logits, MSE of the pre-pool features, or both; mixed with
    cross-entropy when the batch has labels.

    Args:
        objective: "logits", "features" or "both".
        logits: the student's logits.
        teacher_logits: the teacher's logits.
        taps: the pre-pool feature maps of both (for "features" and "both").
        labels: the batch's labels, or None.
        temperature: the distillation temperature.
        alpha: the weight of the distillation term against cross-entropy.

    Returns:
        tuple: (the distillation term, the total loss).
    """
    terms = []
    if objective in ("logits", "both"):
        terms.append(distillation_loss(logits.float(), teacher_logits.float(), temperature))
    if objective in ("features", "both"):
        terms.append(feature_loss(taps.student.float(), taps.teacher.float()))
    distill = sum(terms)
    if labels is None:
        return distill, distill
    return distill, alpha * distill + (1 - alpha) * F.cross_entropy(logits.float(), labels)



def augmenter(augment: str, objective: str, seed: int):
    """A function that augments a batch image by image (teacher and student then see the same images).

    Args:
        augment: "none", "auto", "cifar" or "imagenet" (see `finetune`).
        objective: the run's objective ("auto" does not augment for "logits").
        seed: seed of the random transforms.

    Returns:
        callable or None: batch -> augmented batch; None when nothing is augmented.
    """
    if augment == "none" or (augment == "auto" and objective == "logits"):
        return None
    from torchvision.transforms import v2

    def build(size):
        if augment == "cifar" or (augment == "auto" and min(size) <= AUTO_CIFAR_SIZE):
            return v2.Compose([v2.RandomCrop(size, padding=min(size) // 8), v2.RandomHorizontalFlip()])
        return v2.Compose([v2.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True), v2.RandomHorizontalFlip()])

    transforms: dict = {}
    generator = torch.Generator().manual_seed(seed)

    def apply(images: torch.Tensor) -> torch.Tensor:
        size = tuple(images.shape[-2:])
        t = transforms.setdefault(size, build(size))
        # torchvision's transforms draw from the global generator: seed it from ours for reproducible runs.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
            return torch.stack([t(img) for img in images])

    return apply


def global_pools(converted: nn.Module, original: nn.Module, loader) -> tuple:
    """Both models' global pools, found in their graphs before any training; one image of the first batch
    gives the shapes that recognise a fixed-kernel pool the size of the map."""
    with torch.random.fork_rng(devices=[]):  # reading a batch here must not move the shuffling's generator
        images = split_batch(next(iter(loader)))[0][:1]
    return (global_pool(converted, images.to(model_device(converted))),
            global_pool(original, images.to(model_device(original))))


def features_text(pools) -> str | None:
    """Where the matched feature maps were found, for the report (the teacher's too when it differs)."""
    if pools is None:
        return None
    student, teacher = (str(p) for p in pools)
    return student if student == teacher else f"{student} (teacher: {teacher})"
