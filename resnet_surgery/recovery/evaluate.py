"""Measure a model against labels and against a reference: top-1/top-5, top-1 agreement, KL divergence,
and the relative output error of a model whose outputs are not class logits."""

from __future__ import annotations

import dataclasses
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..arguments import checked_arguments
from ..data import DataSpec, preprocessing, split_batch
from ..engine import SurgeryNotice, output_tensors
from ..errors import SurgeryError
from ..utils import check_model, eval_mode, model_device
from .batches import Batches

__all__ = ["EvalReport", "Scores", "check_label_classes", "dataset_classes", "evaluate", "gives_logits", "output_error", "predict", "score"]


@dataclasses.dataclass
class EvalReport:
    """Accuracy (percent, with labels) and agreement with a reference model (percent; KL in nats).

    Args:
        num_images: images scored.
        top1: top-1 accuracy (None without labels).
        top5: top-5 accuracy (None without labels or with 5 classes or fewer).
        agreement: images where the model's top-1 class equals the reference's (None without a reference).
        kl: mean KL(reference || model) of the softmax predictions (None without a reference).
        seconds: wall time of the evaluation.
    """

    num_images: int
    top1: float | None = None
    top5: float | None = None
    agreement: float | None = None  # images where the model's top-1 class equals the reference's
    kl: float | None = None  # mean KL(reference || model) of the softmax predictions
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        parts = []
        if self.top1 is not None:
            parts.append(f"top-1 {self.top1:.2f}%")
        if self.top5 is not None:
            parts.append(f"top-5 {self.top5:.2f}%")
        if self.agreement is not None:
            parts.append(f"agreement {self.agreement:.2f}%  KL {self.kl:.4f}")
        parts.append(f"({self.num_images} images, {self.seconds:.1f} s)")
        return "  ".join(parts)


class Scores:
    """Running counts behind an EvalReport; ``ref_logits`` keeps the reference's logits of each batch when
    they were computed."""

    def __init__(self):
        self.n = self.labelled = self.correct1 = self.correct5 = self.agree = 0
        self.kl_sum = 0.0
        self.compared = 0
        self.top5_possible = True
        self.ref_logits: list[torch.Tensor | None] = []  # the reference's logits of each batch, when computed

    def add(self, logits: torch.Tensor, labels: torch.Tensor | None, ref_logits: torch.Tensor | None) -> None:
        """Count one batch.

        Args:
            logits: the model's logits (N x classes).
            labels: the batch's labels, or None.
            ref_logits: the reference's logits on the same images, or None.
        """
        if logits.dim() != 2:  # argmax over a map would count pixels, not images (agreements over 100%)
            raise SurgeryError(f"top-1 and agreement need class logits (N x classes) but the model gives "
                               f"{list(logits.shape)}: score a classifier, or compare other outputs by their error")
        logits = logits.float()
        self.n += len(logits)
        if labels is not None:
            labels = labels.to(logits.device)
            if labels.numel() and int(labels.max()) >= logits.shape[1]:
                raise SurgeryError(f"a label is {int(labels.max())} but the model has {logits.shape[1]} classes "
                                   f"(0..{logits.shape[1] - 1}): evaluate on data labelled for this model")
            k = min(5, logits.shape[1])
            self.top5_possible = logits.shape[1] > 5
            top = logits.topk(k, dim=1).indices
            self.labelled += len(labels)
            self.correct1 += int((top[:, 0] == labels).sum())
            self.correct5 += int((top == labels[:, None]).any(dim=1).sum())
        if ref_logits is not None:
            if ref_logits.shape != logits.shape:
                raise SurgeryError(f"the reference/original model gives {ref_logits.shape[-1]} classes but the model "
                                   f"{logits.shape[-1]}: compare with a model that has the same classifier")
            ref_logits = ref_logits.float()
            self.compared += len(logits)
            # a row holding a NaN or infinity agrees with nothing (argmax would pick some class anyway)
            finite = torch.isfinite(logits).all(1) & torch.isfinite(ref_logits).all(1)
            self.agree += int(((logits.argmax(1) == ref_logits.argmax(1)) & finite).sum())
            log_p, log_q = F.log_softmax(ref_logits, dim=1), F.log_softmax(logits, dim=1)
            self.kl_sum += float(F.kl_div(log_q, log_p, log_target=True, reduction="sum"))

    def report(self, seconds: float) -> EvalReport:
        """The counts as percentages.

        Args:
            seconds: the wall time to report.

        Returns:
            EvalReport: accuracy and agreement of the batches counted so far.
        """
        pct = lambda k, n: 100.0 * k / n if n else None  # noqa: E731
        return EvalReport(
            num_images=self.n,
            top1=pct(self.correct1, self.labelled),
            top5=pct(self.correct5, self.labelled) if self.top5_possible else None,
            agreement=pct(self.agree, self.compared),
            kl=self.kl_sum / self.compared if self.compared else None,
            seconds=seconds,
        )


def score(model: nn.Module, reference, batches, desc: str, progress: bool) -> Scores:
    """Scores of ``model`` on ``batches`` against ``reference``.

    Args:
        model: the model to score (its train/eval flags are kept).
        reference: a model (its logits are then kept in ``Scores.ref_logits``), its logits for the batches in
            order (N x classes), or None.
        batches: (images, labels) batches, e.g. `Batches`.
        desc: the progress bar's label.
        progress: show a progress bar.

    Returns:
        Scores: the counts over every batch.
    """
    device = model_device(model)
    scores = Scores()
    given = isinstance(reference, torch.Tensor)
    models = [model] + ([reference] if isinstance(reference, nn.Module) else [])
    with eval_mode(*models), torch.no_grad():
        for images, labels in tqdm(batches, desc=desc, disable=not progress, leave=False):
            images = images.to(device)
            if given:
                ref = reference[scores.n : scores.n + len(images)].to(device)
                if len(ref) != len(images):
                    raise SurgeryError(f"the reference logits cover {len(reference)} images but the data has more")
            else:
                ref = reference(images) if reference is not None else None
                scores.ref_logits.append(ref)
            scores.add(model(images), labels, ref)
    if given and scores.n != len(reference):
        raise SurgeryError(f"the reference logits cover {len(reference)} images but the data has {scores.n}")
    return scores


@checked_arguments
def evaluate(
    model: nn.Module,
    data,
    *,
    reference: nn.Module | torch.Tensor | None = None,
    batch_size: int = 64,
    preset: str | None = None,
    transform=None,
    num_images: int | None = None,
    progress: bool = True,
) -> EvalReport:
    """Top-1/top-5 of ``model`` on ``data`` when it has labels; with ``reference`` (e.g. the original model)
    also the top-1 agreement and mean KL(reference || model). Modules keep their train/eval flags.

    Args:
        model: the model to evaluate.
        data: an ImageFolder path (preprocessed with ``transform`` or ``preset``), a Dataset or a DataLoader.
        reference: a model to compare with, or its logits on ``data`` in its order (N x classes), e.g. from
            `predict`, to compare many models with one original.
        batch_size: images per batch.
        preset: the preprocessing preset of a path (None: see ``transform``).
        transform: the preprocessing of a path's images (None: the preset's, else the one the model's
            weights were published with, else imagenet's; `preprocessing`).
        num_images: evaluate a fixed seeded subset of that many images (None: all).
        progress: show a progress bar.

    Returns:
        EvalReport: accuracy with labels, agreement and KL with a reference.

    Raises:
        SurgeryError: ``data`` that is no folder of images, Dataset or DataLoader, yields no image or batches
            that are neither tensors nor (images, labels); ``batch_size`` or ``num_images`` below 1, or an
            unknown preset; more class folders than the model has classes, or a label it cannot predict; a
            model whose output is not N x classes logits, a reference whose logits have another shape, or
            reference logits for another number of images.
        BadImageError: an image file of a path that cannot be decoded.
        TypeError: ``model`` is not a torch module, or another argument of the wrong type.
    """
    check_model(model)
    spec = DataSpec(data, transform=preprocessing(model, preset, transform), num_images=num_images, batch_size=batch_size,
                    progress=progress)
    loader = spec.loader()
    check_label_classes(model, loader.dataset, "the data")
    start = time.perf_counter()
    scores = score(model, reference, Batches(loader, cache=False), "evaluate", spec.progress)
    if scores.n == 0:
        raise SurgeryError("the data yielded no images; pass a non-empty dataset")
    return scores.report(time.perf_counter() - start)


@checked_arguments
def predict(model: nn.Module, data, *, batch_size: int = 64, preset: str | None = None, transform=None,
            num_images: int | None = None, progress: bool = True) -> torch.Tensor:
    """The logits of ``model`` on ``data`` in order, in eval mode, e.g. a reference for `evaluate`.

    Args:
        model: the model to run.
        data: an ImageFolder path (preprocessed with ``transform`` or ``preset``), a Dataset or a DataLoader.
        batch_size: images per batch.
        preset: the preprocessing preset of a path (None: see ``transform``).
        transform: the preprocessing of a path's images (None: the preset's, else the one the model's
            weights were published with, else imagenet's; `preprocessing`).
        num_images: a fixed seeded subset of that many images (None: all).
        progress: show a progress bar.

    Returns:
        Tensor: the logits, N x classes.

    Raises:
        SurgeryError: ``data`` that is no folder of images, Dataset or DataLoader, yields no image or batches
            that are neither tensors nor (images, labels); ``batch_size`` or ``num_images`` below 1, or an
            unknown preset.
        BadImageError: an image file of a path that cannot be decoded.
        TypeError: ``model`` is not a torch module, or another argument of the wrong type.
    """
    check_model(model)
    spec = DataSpec(data, transform=preprocessing(model, preset, transform), num_images=num_images, batch_size=batch_size,
                    progress=progress)
    device = model_device(model)
    with eval_mode(model), torch.no_grad():
        out = [model(split_batch(b)[0].to(device))
               for b in tqdm(spec.loader(), desc="predict", disable=not spec.progress, leave=False)]
    if not out:
        raise SurgeryError("the data yielded no images; pass a non-empty dataset")
    return torch.cat(out)


def output_error(model: nn.Module, reference: nn.Module, batches, desc: str, progress: bool) -> tuple[float, int]:
    """The measure for outputs that are not class logits (pyramid levels, segmentation maps).

    Args:
        model: the model to measure.
        reference: the model whose outputs it should reproduce.
        batches: (images, labels) batches.
        desc: the progress bar's label.
        progress: show a progress bar.

    Returns:
        tuple: the mean over images and output tensors of ||f(x) - f_ref(x)|| / ||f_ref(x)||, and the images seen.
    """
    device = model_device(model)
    total, n = 0.0, 0
    with eval_mode(model, reference), torch.no_grad():
        for images, _ in tqdm(batches, desc=desc, disable=not progress, leave=False):
            images = images.to(device)
            ys, refs = output_tensors(model(images)), output_tensors(reference(images))
            if not refs or [y.shape for y in ys] != [r.shape for r in refs]:
                raise SurgeryError(f"the converted model's outputs have shapes {[list(y.shape) for y in ys]}, the "
                                   f"original's {[list(r.shape) for r in refs]}; pass the matching original")
            per_image = [(y.float() - r.float()).flatten(1).norm(dim=1) / r.float().flatten(1).norm(dim=1).clamp_min(1e-12)
                         for y, r in zip(ys, refs)]
            total += float(torch.stack(per_image).mean(0).sum())
            n += len(images)
    if n == 0:
        raise SurgeryError("the calibration data yielded no images")
    return total / n, n


def gives_logits(model: nn.Module, batches) -> bool:
    """Whether ``model`` returns class logits (one N x classes tensor), from one image of the first batch.

    Args:
        model: the model to probe.
        batches: (images, labels) batches; the first image of the first one is run.

    Returns:
        bool: True for one 2-D output tensor.
    """
    first = next(iter(batches), None)
    if first is None:
        raise SurgeryError("the calibration data yielded no images")
    with eval_mode(model), torch.no_grad():
        out = model(first[0][:1].to(model_device(model)))
    return isinstance(out, torch.Tensor) and out.dim() == 2


def dataset_classes(data) -> int | None:
    """How many classes the labels of ``data`` can take, when the dataset says so (an ImageFolder's class folders).

    Args:
        data: a Dataset or DataLoader, possibly a Subset of one.

    Returns:
        The number of classes, or None when the dataset does not list them.
    """
    while isinstance(data, (DataLoader, Subset)):
        data = data.dataset
    classes = getattr(data, "classes", None)
    return len(classes) if isinstance(classes, (list, tuple)) and classes else None


def check_label_classes(model: nn.Module, data, what: str) -> None:
    """Labels against the model's classes, before any work: more class folders than classes is refused (labels
    the model can never predict); fewer is a warning, since ImageFolder numbers folders 0..k-1, which is right
    only when they are the model's first k classes (a legitimate subset, e.g. the first classes of ImageNet).

    Args:
        model: the model (a module with parameters; one image of ``data`` is run to count its outputs).
        data: the labelled Dataset or DataLoader.
        what: how the error names the data.
    """
    folders = dataset_classes(data)
    if folders is None or next(model.parameters(), None) is None:
        return  # nothing to compare: no class list, or an ONNX file whose caller checked the labels
    item = (data.dataset if isinstance(data, DataLoader) else data)[0]
    image = item[0] if isinstance(item, (tuple, list)) else item
    with eval_mode(model), torch.no_grad():
        out = model(image[None].to(model_device(model)))
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] == folders:
        return
    classes = out.shape[1]
    if folders > classes:
        raise SurgeryError(f"{what} have {folders} class folders but the model has {classes} classes: labels "
                           f"{classes}..{folders - 1} can never be predicted; pass data labelled for this model")
    warnings.warn(f"{what} have {folders} class folders but the model has {classes} classes: top-1 is right only "
                  f"if the folders, in sorted order, are the model's first {folders} classes", SurgeryNotice, stacklevel=2)
