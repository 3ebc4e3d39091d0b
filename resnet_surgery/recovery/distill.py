"""What fine-tuning minimises: knowledge distillation of the logits, mimicking of the feature map before
global pooling (caught by hooks on the pool), and the augmentation that varies a small set's images."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.blocks import trace
from ..errors import SurgeryError

__all__ = ["AUGMENTATIONS", "AUTO_CIFAR_SIZE", "GLOBAL_POOLS", "Taps", "augmenter", "distillation_loss",
           "feature_loss", "global_pool", "training_loss"]

AUGMENTATIONS = ("none", "auto", "cifar", "imagenet")
AUTO_CIFAR_SIZE = 64  # "auto" augments images up to this size like CIFAR (pad-crop), larger ones like ImageNet
# Global pooling that ends a ResNet's trunk: its input is the feature map that objective="features" matches.
GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


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



def global_pool(model: nn.Module) -> tuple[str, list[str]]:
    """(the global pooling module that ends the trunk, the modules after it: the classifier), from the fx graph.
    Its input is the feature map that objective="features" matches.

    Args:
        model: a model that ends in global pooling and a classifier.

    Returns:
        tuple: the pool's name, and the names of the modules with parameters after it.
    """
    gm = trace(model)
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    pools = [i for i, n in enumerate(nodes) if n.op == "call_module" and isinstance(modules[n.target], GLOBAL_POOLS)
             and modules[n.target].output_size in (1, (1, 1))]
    if not pools:
        raise SurgeryError(f"no global pooling module (nn.AdaptiveAvgPool2d(1)) found in {type(model).__name__}; "
                           "objective='features' needs one: use objective='logits'")
    last = pools[-1]
    after = [n.target for n in nodes[last + 1 :] if n.op == "call_module" and any(True for _ in modules[n.target].parameters())]
    return nodes[last].target, after



@dataclasses.dataclass
class Taps:
    """The pre-pool feature maps of the student and the teacher, caught by forward pre-hooks on the pool.

    Args:
        student: the student's last feature map.
        teacher: the teacher's last feature map.
        handles: the hooks' handles.
    """

    student: torch.Tensor | None = None
    teacher: torch.Tensor | None = None
    handles: list = dataclasses.field(default_factory=list)

    def attach(self, student: nn.Module, teacher: nn.Module, pool: str) -> None:
        """Hook the pool ``pool`` of both models."""
        def keep(attr):
            def hook(_, args):
                setattr(self, attr, args[0])

            return hook

        self.handles = [student.get_submodule(pool).register_forward_pre_hook(keep("student")),
                        teacher.get_submodule(pool).register_forward_pre_hook(keep("teacher"))]

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self.handles:
            h.remove()



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

