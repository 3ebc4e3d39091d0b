"""Measure and recover the accuracy an approximate rewrite costs, without labels.

`evaluate` scores a model (top-1/top-5 with labels) and compares it with a reference (top-1 agreement,
KL divergence). `calibrate` repairs the rewritten blocks of a converted model on a few unlabelled images:
BatchNorm re-estimation, then block reconstruction (every parameter of each rewritten block optimised so
that the block reproduces the original block's output, BRECQ-style) or a least-squares refit of every
rewritten conv. A detection model is calibrated on its trunk (the backbone its recipe names), and a model
whose output is not class logits (pyramid levels, segmentation maps) is measured by its outputs' relative
error instead of top-1 agreement. Fine-tuning (distillation, feature mimicking) lives in `resnet_surgery.finetune`.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d
from tqdm import tqdm

from ..data import as_loader, split_batch
from ..engine.blocks import full_name
from ..errors import SurgeryError
from ..history import history, record_result
from ..utils import eval_mode, model_device

CALIBRATION_STEPS = ("bn", "transfer", "reconstruct")
DEFAULT_STEPS = ("bn", "reconstruct")
# Block reconstruction: optimiser iterations per block, peak learning rate (Adam, cosine to zero), mini-batch.
RECONSTRUCT_ITERATIONS = 500
RECONSTRUCT_LR = 1e-3
RECONSTRUCT_BATCH = 64
# Cached block inputs and targets stay under this size; past it, fewer calibration images are used.
RECONSTRUCT_BYTES = 2 << 30
# Calibration images stay in memory up to this size, so the passes do not decode them again.
CACHE_BYTES = 1 << 30
# Unfolded conv inputs are processed in chunks of about this size, and at most this many rows (output
# positions) per batch enter the least-squares sums: enough for a well-posed fit, bounded memory.
UNFOLD_BYTES = 256 << 20
MAX_ROWS_PER_BATCH = 16384


# --- evaluation ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalReport:
    """Accuracy (percent, with labels) and agreement with a reference model (percent; KL in nats)."""

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


class _Scores:
    """Running counts behind an EvalReport."""

    def __init__(self):
        self.n = self.labelled = self.correct1 = self.correct5 = self.agree = 0
        self.kl_sum = 0.0
        self.compared = 0
        self.top5_possible = True
        self.ref_logits: list[torch.Tensor | None] = []  # the reference's logits of each batch, when computed

    def add(self, logits: torch.Tensor, labels: torch.Tensor | None, ref_logits: torch.Tensor | None) -> None:
        logits = logits.float()
        self.n += len(logits)
        if labels is not None:
            labels = labels.to(logits.device)
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
            self.agree += int((logits.argmax(1) == ref_logits.argmax(1)).sum())
            log_p, log_q = F.log_softmax(ref_logits, dim=1), F.log_softmax(logits, dim=1)
            self.kl_sum += float(F.kl_div(log_q, log_p, log_target=True, reduction="sum"))

    def report(self, seconds: float) -> EvalReport:
        pct = lambda k, n: 100.0 * k / n if n else None  # noqa: E731
        return EvalReport(
            num_images=self.n,
            top1=pct(self.correct1, self.labelled),
            top5=pct(self.correct5, self.labelled) if self.top5_possible else None,
            agreement=pct(self.agree, self.compared),
            kl=self.kl_sum / self.compared if self.compared else None,
            seconds=seconds,
        )


def _scores(model, reference, batches, desc: str, progress: bool) -> _Scores:
    """Scores of ``model`` on ``batches`` against ``reference``: a model (its logits are then kept in
    ``_Scores.ref_logits``), its logits for the batches in order (N x classes), or None."""
    device = model_device(model)
    scores = _Scores()
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


def evaluate(
    model: nn.Module,
    data,
    *,
    reference: nn.Module | torch.Tensor | None = None,
    batch_size: int = 64,
    preset: str = "imagenet",
    transform=None,
    num_images: int | None = None,
    progress: bool = True,
) -> EvalReport:
    """Top-1/top-5 of ``model`` on ``data`` when it has labels; with ``reference`` (e.g. the original model)
    also the top-1 agreement and mean KL(reference || model). Modules keep their train/eval flags.

    ``data``: an ImageFolder path (preprocessed with ``transform`` or ``preset``), a Dataset or a DataLoader.
    ``num_images`` evaluates a fixed seeded subset. ``reference`` may also be the reference's logits on
    ``data`` in its order (N x classes), e.g. from `predict`, to compare many models with one original.
    """
    loader = as_loader(data, preset=preset, transform=transform, batch_size=batch_size, num_images=num_images)
    start = time.perf_counter()
    scores = _scores(model, reference, _Batches(loader, cache=False), "evaluate", progress)
    if scores.n == 0:
        raise SurgeryError("the data yielded no images; pass a non-empty dataset")
    return scores.report(time.perf_counter() - start)


def predict(model: nn.Module, data, *, batch_size: int = 64, preset: str = "imagenet", transform=None,
            num_images: int | None = None, progress: bool = True) -> torch.Tensor:
    """The logits of ``model`` on ``data`` in order (N x classes), in eval mode, e.g. a reference for `evaluate`."""
    loader = as_loader(data, preset=preset, transform=transform, batch_size=batch_size, num_images=num_images)
    device = model_device(model)
    with eval_mode(model), torch.no_grad():
        out = [model(split_batch(b)[0].to(device)) for b in tqdm(loader, desc="predict", disable=not progress, leave=False)]
    if not out:
        raise SurgeryError("the data yielded no images; pass a non-empty dataset")
    return torch.cat(out)


def _output_error(model: nn.Module, reference: nn.Module, batches, desc: str, progress: bool) -> tuple[float, int]:
    """Mean over images and output tensors (pyramid levels, segmentation maps) of ||f(x) - f_ref(x)|| /
    ||f_ref(x)||, and the images seen: the measure for outputs that are not class logits."""
    from ..engine.probe import output_tensors

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


def _gives_logits(model: nn.Module, batches) -> bool:
    """Whether ``model`` returns class logits (one N x classes tensor), from one image of the first batch."""
    first = next(iter(batches), None)
    if first is None:
        raise SurgeryError("the calibration data yielded no images")
    with eval_mode(model), torch.no_grad():
        out = model(first[0][:1].to(model_device(model)))
    return isinstance(out, torch.Tensor) and out.dim() == 2


def _trunks(converted: nn.Module, original: nn.Module, trunk: str | None) -> tuple[nn.Module, nn.Module]:
    """What calibration runs on: both models' trunk when the recipe names one (a detection model's backbone,
    which takes the normalised image batch), else the models themselves."""
    if not trunk:
        return converted, original
    return (_module(converted, trunk, nn.Module, "the converted model"),
            _module(original, trunk, nn.Module, "the original model"))


def _in_trunk(name: str, trunk: str | None) -> str:
    """A recipe's full module path relative to the trunk."""
    return name.removeprefix(f"{trunk}.") if trunk else name


def _full_names(report, trunk: str | None) -> None:
    """The report's conv and block names as full paths in the whole model, as the recipe names them."""
    if not trunk:
        return
    def full(name):  # a missing previous block stays None
        return full_name(trunk, name) if name else name

    for f in report.fits:
        f.conv, f.target = full(f.conv), full(f.target)
    for b in report.blocks:
        b.block, b.previous = full(b.block), full(b.previous)


# --- calibration ----------------------------------------------------------------------------------


@dataclasses.dataclass
class CalibrationStep:
    """One calibration step: what it cost and where it left the model (measured on the calibration images)."""

    step: str  # "naive copy" | "bn" | "transfer"
    images: int  # calibration images the step used (0 for the naive copy)
    passes: int  # forward passes over them
    cpu_seconds: float  # process CPU time, all threads
    wall_seconds: float
    agreement: EvalReport  # against the original model (only num_images when the outputs are not logits)
    # Outputs that are not class logits: mean over images and output tensors of ||f - f_orig|| / ||f_orig||.
    output_error: float | None = None


@dataclasses.dataclass
class ConvFit:
    """The least-squares refit of one converted conv to the original conv's output."""

    conv: str
    target: str
    rows: int  # output positions that entered the fit
    unknowns: int  # weights per output channel (and group) the fit solves for
    error_before: float  # squared error relative to the target's variance, with the weights before the fit
    error_after: float


@dataclasses.dataclass
class BlockFit:
    """The reconstruction of one rewritten block: its output error against the original block's output."""

    block: str
    previous: str | None  # the block before it, optimised with it (None: the block alone)
    images: int  # calibration images whose inputs and targets were cached
    iterations: int
    error_before: float  # squared error relative to the target's per-channel variance
    error_after: float
    cpu_seconds: float


@dataclasses.dataclass
class CalibrationReport:
    num_images: int
    ridge: float
    steps: list[CalibrationStep]
    fits: list[ConvFit]
    blocks: list[BlockFit] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        if self.steps and self.steps[0].output_error is not None:
            lines = [f"{'step':<12} {'images':>7} {'cpu s':>8} {'output error':>13}"]
            lines += [f"{s.step:<12} {s.images:>7} {s.cpu_seconds:>8.1f} {s.output_error:>13.4f}" for s in self.steps]
            return "\n".join(lines + self._fit_lines())
        lines = [f"{'step':<12} {'images':>7} {'cpu s':>8} {'agreement':>10} {'KL':>8} {'top-1':>7}"]
        for s in self.steps:
            a = s.agreement
            top1 = f"{a.top1:.2f}" if a.top1 is not None else "-"
            lines.append(f"{s.step:<12} {s.images:>7} {s.cpu_seconds:>8.1f} {a.agreement:>9.2f}% {a.kl:>8.4f} {top1:>7}")
        return "\n".join(lines + self._fit_lines())

    def _fit_lines(self) -> list[str]:
        lines = []
        for f in self.fits:
            # Fewer equations than unknowns: the fit reproduces the calibration images, not the function.
            few = f" (only {f.rows} positions for {f.unknowns} weights: use more images)" if f.rows < 4 * f.unknowns else ""
            lines.append(f"  refit {f.conv} -> {f.target}: relative error {f.error_before:.4f} -> {f.error_after:.4f}{few}")
        for b in self.blocks:
            name = f"{b.previous} + {b.block}" if b.previous else b.block
            lines.append(f"  reconstruct {name}: relative error {b.error_before:.4f} -> {b.error_after:.4f} "
                         f"({b.iterations} iterations on {b.images} images, {b.cpu_seconds:.1f} CPU s)")
        return lines


class _Batches:
    """Re-iterable (images, labels) batches of a loader, kept in memory (when under CACHE_BYTES) after the
    first pass so later passes neither decode again nor depend on the loader's shuffling."""

    def __init__(self, loader, cache: bool = True):
        self.loader = loader
        self.cached: list | None = None
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cached) if self.cached is not None else len(self.loader)

    def __iter__(self):
        if self.cached is not None:
            yield from self.cached
            return
        kept, size = ([] if self.cache else None), 0
        for batch in self.loader:
            images, labels = split_batch(batch)
            if kept is not None:
                size += images.numel() * images.element_size()
                if size <= CACHE_BYTES:
                    kept.append((images, labels))
                else:
                    kept = None  # too big to keep: later passes read the loader again
            yield images, labels
        self.cached = kept


class _CPUTimer:
    def __enter__(self):
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu, self.wall = time.process_time() - self.cpu, time.perf_counter() - self.wall


def approximate_rewrites(model: nn.Module) -> list:
    """The Rewrites of ``history(model).recipe`` (earlier conversions of a chain included) that change the function."""
    recipe = history(model).recipe
    if recipe is None:
        raise SurgeryError(
            "the model has no recipe; calibrate and finetune need a model returned by "
            "resnet_surgery.convert() or loaded with resnet_surgery.load()"
        )
    # Earlier conversions of a chain (e.g. an approximate v1, then an exact prune) count too.
    return [r for step in [*recipe.history, recipe] for r in step.rewrites if not r.exact]


def _module(model: nn.Module, name: str, kind: type, what: str) -> nn.Module:
    try:
        m = model.get_submodule(name)
    except AttributeError:
        raise SurgeryError(f"{what} has no module {name!r} named in the recipe; pass the matching model") from None
    if not isinstance(m, kind):
        raise SurgeryError(f"{what} module {name!r} is a {type(m).__name__}, expected {kind.__name__}")
    return m


def _batchnorms(model: nn.Module, norms: Sequence[str]) -> dict[str, nn.Module]:
    layers = {n: model.get_submodule(n) for n in dict.fromkeys(norms)}
    return {n: m for n, m in layers.items() if isinstance(m, FrozenBatchNorm2d)
            or isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


def _average_batch_stats(bn: nn.Module, sums: list):
    """A forward hook that adds this batch's statistics to ``sums`` and normalises with them (training-mode
    BatchNorm), for a FrozenBatchNorm2d, which has no training mode."""

    def hook(_, args, output):
        x = args[0]
        mean, var = _channel_stats(x)
        sums[0], sums[1], sums[2] = sums[0] + mean, sums[1] + var, sums[2] + 1
        return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), bn.weight, bn.bias, False, 0.0, bn.eps)

    return hook


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance of an N x C x ... activation (what BatchNorm tracks)."""
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x.float(), dim=dims, correction=1)
    return mean, var


def reestimate_bn(model: nn.Module, norms: Sequence[str], batches, *, reference: nn.Module | None = None,
                  progress: bool = True) -> int:
    """Re-estimate the running statistics of the BatchNorm layers ``norms`` of ``model`` on ``batches``, with
    every other module in eval mode. Returns the images seen.

    Without ``reference``: reset them and recompute them as plain averages of batch statistics (momentum=None).
    A FrozenBatchNorm2d (torchvision's detection trunks) has no training mode: hooks average its batch statistics.
    With ``reference`` (the original model): match it. A norm that ``reference`` has too (same name and size)
    gets statistics that normalise ``model``'s new activations the way ``reference``'s running statistics
    normalise its own activations on the same images, matching mean and variance. That is plain re-estimation
    when the reference's statistics describe these images, and it keeps a norm whose input did not change as
    it was even when they do not (e.g. statistics gathered on augmented training images).
    """
    layers = _batchnorms(model, norms)
    if not layers:
        return 0
    if reference is None:
        return _plain_bn(model, list(layers.values()), batches, progress)
    ref_layers = _batchnorms(reference, list(layers))
    ref_layers = {n: m for n, m in ref_layers.items() if m.running_mean.shape == layers[n].running_mean.shape}
    device = model_device(model)
    ref_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    sums = {n: [0.0, 0.0, 0] for n in layers}  # running sums of the new mean and variance, batch count

    def record(name):
        def hook(_, args):
            ref_stats[name] = _channel_stats(args[0])

        return hook

    def renormalise(name):
        def hook(bn, args, output):
            x = args[0]
            mean, var = _channel_stats(x)
            if name in ref_stats:
                # Same standardised distribution as the reference: (x - mean') / std' ~ (x_ref - mu) / sigma.
                ref_mean, ref_var = ref_stats[name]
                ref_running_mean, ref_running_var = ref_layers[name].running_mean, ref_layers[name].running_var
                var = ((ref_running_var + bn.eps) * (var + bn.eps) / (ref_var + bn.eps) - bn.eps).clamp_min(0)
                mean = mean - ((var + bn.eps) / (ref_running_var + bn.eps)).sqrt() * (ref_mean - ref_running_mean)
            s = sums[name]
            s[0], s[1], s[2] = s[0] + mean, s[1] + var, s[2] + 1
            # Downstream layers of this pass see activations normalised with this batch's estimate.
            return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), bn.weight, bn.bias, False, 0.0, bn.eps)

        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in ref_layers.items()]
    handles += [m.register_forward_hook(renormalise(n)) for n, m in layers.items()]
    images_seen = 0
    try:
        with eval_mode(model, reference), torch.no_grad():
            for images, _ in tqdm(batches, desc="BatchNorm re-estimation", disable=not progress, leave=False):
                images = images.to(device)
                ref_stats.clear()
                reference(images)
                model(images)
                images_seen += len(images)
    finally:
        for h in handles:
            h.remove()
    _write_stats(layers, sums)
    return images_seen


def _write_stats(layers: dict[str, nn.Module], sums: dict[str, list]) -> None:
    for name, m in layers.items():
        mean, var, count = sums[name]
        if count:
            m.running_mean.copy_(mean / count)
            m.running_var.copy_(var / count)
            if hasattr(m, "num_batches_tracked"):  # FrozenBatchNorm2d counts nothing
                m.num_batches_tracked.fill_(count)


def _plain_bn(model: nn.Module, layers: list[nn.Module], batches, progress: bool) -> int:
    device = model_device(model)
    frozen = {str(i): m for i, m in enumerate(layers) if isinstance(m, FrozenBatchNorm2d)}
    layers = [m for m in layers if not isinstance(m, FrozenBatchNorm2d)]
    momenta = [m.momentum for m in layers]
    sums = {n: [0.0, 0.0, 0] for n in frozen}
    handles = [m.register_forward_hook(_average_batch_stats(m, sums[n])) for n, m in frozen.items()]
    images_seen = 0
    with eval_mode(model), torch.no_grad():
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch counts the same
            m.train()
        try:
            for images, _ in tqdm(batches, desc="BatchNorm re-estimation", disable=not progress, leave=False):
                model(images.to(device))
                images_seen += len(images)
        finally:
            for m, momentum in zip(layers, momenta):
                m.momentum = momentum
            for h in handles:
                h.remove()
    _write_stats(frozen, sums)
    return images_seen


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the wanted activation is captured."""


def _capture(model: nn.Module, module: nn.Module, images: torch.Tensor, what: str) -> torch.Tensor:
    """The input or output of ``module`` when ``model`` runs on ``images``; the rest of the forward is skipped."""
    got = []

    def pre_hook(_, args):
        got.append(args[0])
        raise _Stop

    def hook(_, args, output):
        got.append(output)
        raise _Stop

    handle = module.register_forward_pre_hook(pre_hook) if what == "input" else module.register_forward_hook(hook)
    try:
        model(images)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not got:
        raise SurgeryError(f"the forward pass never called {type(module).__name__} module; is it used?")
    return got[0]


def _run_hooked(model: nn.Module, handles: list, images: torch.Tensor) -> None:
    """Run ``model`` on ``images`` without gradients for the hooks ``handles`` to see, then remove them."""
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()


def _execution_order(model: nn.Module, names: Sequence[str], images: torch.Tensor) -> list[str]:
    """``names`` (conv modules) sorted by when the forward first calls them."""
    order: list[str] = []

    def seen(name):
        return lambda *_: order.append(name) if name not in order else None

    _run_hooked(model, [model.get_submodule(n).register_forward_pre_hook(seen(n)) for n in names], images)
    missing = [n for n in names if n not in order]
    if missing:
        raise SurgeryError(f"the forward pass never calls {', '.join(missing)}; is the recipe from this model?")
    return order


def _pad_for(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """F.pad amounts (left, right, top, bottom) equivalent to the conv's own padding."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        pads = []
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


class _LeastSquares:
    """Sums X^T X and X^T Y (float64) for refitting a conv: X = the conv's unfolded input patches,
    Y = the target outputs at the same positions, one block per group of a grouped conv."""

    def __init__(self, conv: nn.Conv2d, seed: int = 0):
        self.conv = conv
        self.g = conv.groups
        self.cin = conv.in_channels // self.g
        self.cout = conv.out_channels // self.g
        kh, kw = conv.kernel_size
        self.d = self.cin * kh * kw + (conv.bias is not None)  # a ones column carries the bias
        dev = conv.weight.device
        self.xtx = torch.zeros(self.g, self.d, self.d, dtype=torch.float64, device=dev)
        self.xty = torch.zeros(self.g, self.d, self.cout, dtype=torch.float64, device=dev)
        self.yty = torch.zeros(self.g, self.cout, dtype=torch.float64, device=dev)
        self.ysum = torch.zeros(self.g, self.cout, dtype=torch.float64, device=dev)
        self.rows = 0
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        conv = self.conv
        x = F.pad(x, _pad_for(conv), mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
        n = len(x)
        positions = y.shape[-2] * y.shape[-1]
        # Sample the same output positions for every image of the batch when there are too many rows.
        keep = None
        if n * positions > MAX_ROWS_PER_BATCH:
            count = max(1, MAX_ROWS_PER_BATCH // n)
            keep = torch.randperm(positions, generator=self.generator)[:count].to(x.device)
        y = y.flatten(2)
        chunk = max(1, UNFOLD_BYTES // (x[0].numel() * conv.kernel_size[0] * conv.kernel_size[1] * 4))
        for i in range(0, n, chunk):
            cols = F.unfold(x[i : i + chunk], conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
            if cols.shape[-1] != positions:
                raise SurgeryError(
                    f"the converted conv yields {cols.shape[-1]} positions but its target yields {positions}; "
                    "the recipe's conv pairs must have the same output shape"
                )
            target = y[i : i + chunk]
            if keep is not None:
                cols, target = cols[..., keep], target[..., keep]
            rows = cols.shape[0] * cols.shape[-1]
            # (images, g*d, L) -> (g, rows, d); (images, g*cout, L) -> (g, rows, cout)
            X = cols.transpose(1, 2).reshape(rows, self.g, -1).transpose(0, 1).float()
            if conv.bias is not None:
                X = torch.cat([X, X.new_ones(self.g, rows, 1)], dim=2)
            Y = target.transpose(1, 2).reshape(rows, self.g, self.cout).transpose(0, 1).float()
            # float32 products per chunk (fast), float64 sums across chunks (accurate).
            Xt = X.transpose(1, 2)
            self.xtx += (Xt @ X).double()
            self.xty += (Xt @ Y).double()
            self.yty += (Y * Y).sum(1).double()
            self.ysum += Y.sum(1).double()
            self.rows += rows

    def _weights(self) -> torch.Tensor:
        """The conv's current parameters as (g, d, cout)."""
        w = self.conv.weight.detach().double().reshape(self.g, self.cout, -1).transpose(1, 2)
        if self.conv.bias is not None:
            w = torch.cat([w, self.conv.bias.detach().double().reshape(self.g, 1, self.cout)], dim=1)
        return w

    def _relative_error(self, w: torch.Tensor) -> float:
        # ||XW - Y||^2 = tr(W^T X^T X W) - 2 tr(W^T X^T Y) + tr(Y^T Y), over the target's total variance.
        err = (w * (self.xtx @ w)).sum() - 2 * (w * self.xty).sum() + self.yty.sum()
        var = self.yty.sum() - (self.ysum**2).sum() / self.rows
        return float(err / var.clamp_min(1e-30))

    def solve(self, ridge: float) -> tuple[float, float]:
        """Set the conv's weights (and bias) to the ridge least-squares fit; returns the relative errors
        before and after."""
        if self.rows == 0:
            raise SurgeryError("no calibration images reached the conv; pass data with at least one image")
        before = self._relative_error(self._weights())
        a = self.xtx.clone()
        k = self.d - (self.conv.bias is not None)  # the bias column is not shrunk
        diag = a.diagonal(dim1=1, dim2=2)
        # The ridge is relative to the mean input energy, so one value suits every layer.
        scale = diag[:, :k].mean(dim=1, keepdim=True).clamp_min(1e-12)
        diag[:, :k] += ridge * scale
        try:
            w = torch.linalg.solve(a, self.xty)
        except torch.linalg.LinAlgError:
            raise SurgeryError(
                f"the calibration inputs of a conv are degenerate (singular covariance); use ridge > 0 "
                f"(now {ridge}) or more calibration images"
            ) from None
        after = self._relative_error(w)
        conv = self.conv
        with torch.no_grad():
            conv.weight.copy_(w[:, : k, :].transpose(1, 2).reshape(conv.weight.shape).to(conv.weight.dtype))
            if conv.bias is not None:
                conv.bias.copy_(w[:, k, :].reshape(-1).to(conv.bias.dtype))
        return before, after


def transfer_weights(
    model: nn.Module,
    original: nn.Module,
    convs: dict[str, str],
    batches,
    *,
    ridge: float = 1e-3,
    progress: bool = True,
) -> list[ConvFit]:
    """Refit each conv ``name`` of ``model`` in ``convs`` {name: original_name} so that, on the inputs it now
    receives, its output matches ``original``'s conv ``original_name`` (before its norm) by ridge least
    squares. Convs are fitted in forward order, each on the activations left by the fits before it."""
    device = model_device(model)
    for name, target in convs.items():
        _module(model, name, nn.Conv2d, "the converted model")
        _module(original, target, nn.Conv2d, "the original model")
    first = next(iter(batches), None)
    if first is None:
        raise SurgeryError("the calibration data yielded no images")
    fits = []
    with eval_mode(model, original), torch.no_grad():
        order = _execution_order(model, list(convs), first[0].to(device))
        for i, name in enumerate(order):
            conv, ref = model.get_submodule(name), original.get_submodule(convs[name])
            sums = _LeastSquares(conv, seed=i)
            for images, _ in tqdm(batches, desc=f"refit {name}", disable=not progress, leave=False):
                images = images.to(device)
                sums.add(_capture(model, conv, images, "input"), _capture(original, ref, images, "output"))
            before, after = sums.solve(ridge)
            fits.append(ConvFit(name, convs[name], sums.rows, sums.d, before, after))
    return fits


def _unit_io(model: nn.Module, original: nn.Module, unit: nn.Module, first: str, name: str, batches,
             max_bytes: int, device):
    """The inputs of ``model``'s block ``first`` (from ``model`` as it is now) and the outputs of ``original``'s
    block ``name`` on ``batches``, concatenated on the CPU; stops adding batches once ``max_bytes`` would be
    passed."""
    start, ref = model.get_submodule(first), original.get_submodule(name)
    inputs, targets, size = [], [], 0
    for images, _ in batches:
        images = images.to(device)
        x, y = _capture(model, start, images, "input"), _capture(original, ref, images, "output")
        if not inputs and unit(x[:1]).shape[1:] != y.shape[1:]:
            raise SurgeryError(f"block {name} yields {tuple(unit(x[:1]).shape[1:])} but the original's yields "
                               f"{tuple(y.shape[1:])}; reconstruction needs the same output shape")
        per_image = (x[0].numel() + y[0].numel()) * 4
        room = (max_bytes - size) // per_image
        if room <= 0:
            break
        inputs.append(x[:room].float().cpu())
        targets.append(y[:room].float().cpu())
        size += per_image * len(inputs[-1])
    if not inputs:
        raise SurgeryError(f"one calibration image's activations at block {name} exceed the cache "
                           f"({max_bytes} bytes); raise max_bytes")
    return torch.cat(inputs), torch.cat(targets)


def _relative_error(unit: nn.Module, x: torch.Tensor, y: torch.Tensor, device, chunk: int = 256) -> float:
    """sum |unit(x) - y|^2 over the target's sum of squared deviations from its per-channel means."""
    dims = [0, *range(2, y.dim())]
    var = ((y - y.mean(dim=dims, keepdim=True)) ** 2).sum().double()
    err = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            out = unit(x[i : i + chunk].to(device)).float().cpu()
            err += ((out - y[i : i + chunk]) ** 2).sum().double()
    return float(err / var.clamp_min(1e-30))


def previous_blocks(model: nn.Module, blocks: Sequence[str], images: torch.Tensor) -> dict[str, str | None]:
    """For each block in ``blocks``, the residual block whose output *is* its input (None when it reads
    anything else, e.g. the stem), found by running ``model`` once on ``images``."""
    from ..engine.blocks import find_blocks, trace

    names = [b.name for b in find_blocks(trace(model))]
    modules = {n: m for n in names if (m := _submodule(model, n)) is not None}
    outputs: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _, __, out, n=n: outputs.__setitem__(n, out)) for n, m in modules.items()]
    handles += [model.get_submodule(n).register_forward_pre_hook(lambda _, args, n=n: inputs.__setitem__(n, args[0]))
                for n in blocks]
    _run_hooked(model, handles, images)
    return {n: next((p for p, out in outputs.items() if p != n and out is inputs.get(n)), None) for n in blocks}


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name) if name else None
    except AttributeError:
        return None


def reconstruct_blocks(
    model: nn.Module,
    original: nn.Module,
    blocks: Sequence[str],
    batches,
    *,
    iterations: int = RECONSTRUCT_ITERATIONS,
    lr: float = RECONSTRUCT_LR,
    batch_size: int = RECONSTRUCT_BATCH,
    previous: bool = True,
    max_bytes: int = RECONSTRUCT_BYTES,
    seed: int = 0,
    progress: bool = True,
) -> list[BlockFit]:
    """Optimise every parameter of each block ``name`` of ``model`` (in place) so that, fed with the input
    ``model`` now gives it, it reproduces the output of ``original``'s block of the same name (MSE; Adam with a
    cosine schedule; ``iterations`` mini-batches of ``batch_size`` drawn from the cached activations of
    ``batches``). Blocks go in forward order, each on the inputs left by the ones before it (BRECQ).

    With ``previous``, the block whose output is the rewritten block's input is optimised with it (when there
    is one): after a stride move that block's output is read at other positions than before (v1 reads 1 of 4),
    and it can move there what the rewritten block needs. Norms stay in eval mode, so running statistics are
    untouched; no other parameter changes."""
    device = model_device(model)
    for name in blocks:
        _module(model, name, nn.Module, "the converted model")
        _module(original, name, nn.Module, "the original model")
    first = next(iter(batches), None)
    if first is None:
        raise SurgeryError("the calibration data yielded no images")
    generator = torch.Generator().manual_seed(seed)
    fits = []
    with eval_mode(model, original):
        with torch.no_grad():
            order = _execution_order(model, list(blocks), first[0][:2].to(device))
        before_of = previous_blocks(model, order, first[0][:2].to(device)) if previous else {}
        for name in order:
            prev = before_of.get(name)
            names = [prev, name] if prev else [name]
            unit = nn.Sequential(*(model.get_submodule(n) for n in names))  # shares the modules: trains in place
            start = time.process_time()
            with torch.no_grad():
                x, y = _unit_io(model, original, unit, names[0], name, batches, max_bytes, device)
            before = _relative_error(unit, x, y, device)
            params = [p for p in unit.parameters() if p.requires_grad]
            opt = torch.optim.Adam(params, lr=lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, iterations))
            try:
                with torch.enable_grad():
                    for _ in tqdm(range(iterations), desc=f"reconstruct {name}", disable=not progress, leave=False):
                        pick = torch.randint(len(x), (min(batch_size, len(x)),), generator=generator)
                        loss = F.mse_loss(unit(x[pick].to(device)), y[pick].to(device))
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        sched.step()
            finally:
                for p in params:
                    p.grad = None
            after = _relative_error(unit, x, y, device)
            fits.append(BlockFit(name, prev, len(x), iterations, before, after, time.process_time() - start))
            del x, y
    return fits


def check_steps(steps: Sequence[str]) -> None:
    """One SurgeryError naming the first step that is not a calibration step."""
    if unknown := [s for s in steps if s not in CALIBRATION_STEPS]:
        raise SurgeryError(f"unknown calibration step {unknown[0]!r}; choose from {', '.join(CALIBRATION_STEPS)}")


def calibrate(
    converted: nn.Module,
    original: nn.Module,
    data,
    *,
    num_images: int | None = 2048,
    steps: Sequence[str] = DEFAULT_STEPS,
    iterations: int = RECONSTRUCT_ITERATIONS,
    lr: float = RECONSTRUCT_LR,
    previous: bool = True,
    ridge: float = 1e-3,
    batch_size: int = 64,
    preset: str = "imagenet",
    transform=None,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """A new model: ``converted`` with its approximately rewritten blocks repaired on unlabelled ``data``.

    Steps, in the order given: "bn" re-estimates the running statistics of the rewritten blocks' BatchNorms
    on the new activations; "transfer" refits each rewritten conv by ridge least squares (``ridge`` relative
    to the mean input energy) to reproduce ``original``'s conv output, then re-estimates those BatchNorms
    again when "bn" is among the steps; "reconstruct" optimises every parameter of each rewritten block, in
    forward order, so that the block reproduces the original block's output (``iterations`` Adam steps per
    block at peak ``lr``; with ``previous`` the block before it is optimised jointly; see
    `reconstruct_blocks`). Statistics are not re-estimated after "reconstruct":
    it optimised the block against the statistics it had (re-estimating then costs accuracy).
    ``num_images`` is a seeded random subset of ``data`` (None: all of it). ``history(result).calibration`` is a
    CalibrationReport with the agreement with ``original`` before and after each step on the calibration
    images; ``converted`` is untouched. Deterministic for a given ``seed``.

    A detection model (its recipe names a trunk, e.g. "backbone": ResNet + FPN) is calibrated on its trunk:
    the calibration images go straight into it, so preprocess them as the model's transform would (the
    "imagenet" preset's mean and std are those of torchvision's GeneralizedRCNNTransform; the size is yours).
    The whole model comes back with its trunk repaired. When the outputs are not class logits (pyramid
    levels, a segmentation model's {"out", "aux"}), each step reports ``output_error``, the mean relative
    error ||f - f_orig|| / ||f_orig|| over images and output tensors, instead of top-1 agreement.
    """
    check_steps(steps)
    if iterations < 1 or lr <= 0:
        raise SurgeryError(f"reconstruction needs iterations >= 1 and lr > 0, not {iterations} and {lr}")
    records = approximate_rewrites(converted)
    if not records:
        raise SurgeryError("the conversion is exact (no approximate rewrites): the model already computes the "
                           "original's function, so there is nothing to calibrate")
    trunk = history(converted).recipe.trunk
    model = copy.deepcopy(converted)
    # Every step runs on the trunk (the whole model when it traces whole), with names relative to it.
    body, reference_body = _trunks(model, original, trunk)
    norms = [_in_trunk(n, trunk) for r in records for n in r.norms]
    convs = {_in_trunk(c, trunk): _in_trunk(t, trunk) for r in records for c, t in r.convs.items()}
    blocks = list(dict.fromkeys(_in_trunk(r.block, trunk) for r in records))
    loader = as_loader(data, preset=preset, transform=transform, batch_size=batch_size,
                       num_images=num_images, seed=seed)
    batches = _Batches(loader)
    logits = _gives_logits(body, batches)

    reference = reference_body  # replaced by its logits once the batches stay in memory: computed once

    def measure(step: str, timer: _CPUTimer | None, images: int, passes: int) -> None:
        nonlocal reference
        cpu, wall = (timer.cpu, timer.wall) if timer else (0.0, 0.0)
        if not logits:
            error, n = _output_error(body, reference_body, batches, f"output error after {step}", progress)
            report.steps.append(CalibrationStep(step, images, passes, cpu, wall, EvalReport(num_images=n), error))
            return
        scores = _scores(body, reference, batches, f"agreement after {step}", progress)
        if scores.ref_logits and batches.cached is not None:
            reference = torch.cat(scores.ref_logits)
        agreement = scores.report(0.0)
        report.steps.append(CalibrationStep(step, images, passes, cpu, wall, agreement))

    report = CalibrationReport(num_images=0, ridge=ridge, steps=[], fits=[])
    measure("naive copy", None, 0, 0)
    report.num_images = report.steps[0].agreement.num_images
    for step in dict.fromkeys(steps):
        with _CPUTimer() as timer:
            if step == "bn":
                images = reestimate_bn(body, norms, batches, reference=reference_body, progress=progress)
                passes = 1
            elif step == "transfer":
                report.fits = transfer_weights(body, reference_body, convs, batches, ridge=ridge, progress=progress)
                images, passes = report.num_images, len(convs)
                if "bn" in steps:
                    # The refits changed the activations the re-estimated statistics describe.
                    reestimate_bn(body, norms, batches, reference=reference_body, progress=progress)
                    passes += 1
            else:
                report.blocks = reconstruct_blocks(body, reference_body, blocks, batches, iterations=iterations,
                                                   lr=lr, previous=previous, seed=seed, progress=progress)
                images, passes = min(b.images for b in report.blocks), len(blocks)
        measure(step, timer, images, passes)
    _full_names(report, trunk)
    record_result(model, "calibration", report, report.to_dict())
    return model
