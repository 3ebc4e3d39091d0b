"""Export a model to ONNX and prove, in onnxruntime, that the file computes what the model computes.

Parity is part of export: the file is written under a temporary name, checked with
``onnx.checker.check_model(full_check=True)``, run in onnxruntime beside PyTorch on the same random
inputs (batch 1, and a larger batch when the batch axis is dynamic), and only renamed into place when
every check passes.

Tolerance: a check passes when ``max |onnx - torch| <= atol + rtol * max |torch|`` over all outputs of
the batch. The relative difference reported is ``max |onnx - torch| / max |torch|``: the worst error
relative to the largest logit, so near-zero logits cannot blow it up. Top-1 agreement is reported but
does not gate: two logits closer than the tolerance may swap places without the file being wrong.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ..arguments import checked_arguments, with_overrides
from ..atomic import atomic_file, check_writable, staging_dir
from ..defaults import MAX_BATCH
from ..engine import count_macs, output_tensors
from ..errors import SurgeryError, first_line
from ..utils import check_model, eval_mode, image_size, model_device
from .onnxfile import MACS_METADATA_KEY, onnx_input_shape, onnx_metadata, set_metadata
from .onnxfile import opset as opset_of
from .parity import ParityCheck, ParityReport
from .runtime import onnx_session

__all__ = ["MACS_METADATA_KEY", "ExportError", "ExportOptions", "OnnxModule", "ParityError", "check_opset", "export_onnx", "onnx_input_shape", "onnx_metadata",
           "supported_opsets"]

# Protobuf cannot hold a model over 2 GiB; keep a margin for the graph itself.
_MAX_INLINE_BYTES = int(1.9 * 2**30)


class ExportError(SurgeryError):
    """Neither ONNX exporter could export the model, or the file it wrote is not valid ONNX."""


class ParityError(SurgeryError):
    """The exported file does not compute what the PyTorch model computes; ``.report`` has the figures."""

    def __init__(self, message: str, report: ParityReport):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """How `export_onnx` exports a model and checks the file.

    Args:
        dynamic_batch: leave the batch axis dynamic (else fixed to 1).
        opset: ONNX opset (None: the exporter's default).
        atol: parity's absolute tolerance.
        rtol: parity's tolerance relative to the largest |output|.
        parity_batch: the second batch size checked when the batch axis is dynamic.
        seed: seed of the random parity inputs.
    """

    dynamic_batch: bool = True
    opset: int | None = None
    atol: float = 1e-4
    rtol: float = 1e-3
    parity_batch: int = 4
    seed: int = 0


@checked_arguments
def export_onnx(model: nn.Module, path: str | os.PathLike, *, input_size: int | tuple[int, int, int] = (3, 224, 224),
                options: ExportOptions | None = None, force: bool = False, **overrides) -> ParityReport:
    """Export ``model`` to ``path`` as one self-contained .onnx file and verify it in onnxruntime.

    Args:
        model: the model; one image tensor in, a tensor (or tensors in lists, tuples, dicts) out.
        path: the .onnx file to write.
        input_size: (channels, height, width) of one image.
        options: how to export and check it (`ExportOptions`); None: its defaults.
        force: overwrite ``path`` if it exists.
        **overrides: `ExportOptions` fields, e.g. ``export_onnx(model, "m.onnx", dynamic_batch=False)``.

    Returns:
        The parity report.

    Raises:
        SurgeryError: an unsupported ``opset``, a negative tolerance, or ``path`` exists without ``force`` or
            cannot be written.
        ExportError: no exporter succeeds (e.g. a forward that branches on tensor values), or the file fails
            onnx.checker, cannot be loaded by onnxruntime or gives other output shapes; nothing is left at
            ``path``.
        ParityError: onnxruntime's outputs differ from PyTorch's beyond the tolerance, or are not finite
            (``.report`` holds the figures); nothing is left at ``path``.
        TypeError: ``model`` is not a torch module, ``input_size`` not an int or (C, H, W), or another
            argument or options field of the wrong type.
    """
    o = with_overrides(ExportOptions, options, overrides, "export_onnx()")
    check_model(model)
    check_opset(o.opset)
    if o.atol < 0 or o.rtol < 0:
        raise SurgeryError(f"parity tolerances must be >= 0, got atol {o.atol} and rtol {o.rtol}")
    if not (1 <= o.parity_batch <= MAX_BATCH and 0 <= o.seed < 2**63):
        raise SurgeryError(f"parity_batch takes an integer from 1 to {MAX_BATCH} and seed one from 0 to 2^63-1, got "
                           f"{o.parity_batch} and {o.seed}")
    path = check_writable(path, force)
    job = ExportJob(image_size(input_size), o.dynamic_batch, o.opset, o.atol, o.rtol, o.parity_batch, force, o.seed)
    with eval_mode(model):
        return _export_verified(model, path, job)


@dataclasses.dataclass(frozen=True)
class ExportJob:
    """One export_onnx call's settings together (its options, input size and force)."""

    input_size: tuple[int, int, int]
    dynamic_batch: bool
    opset: int | None
    atol: float
    rtol: float
    parity_batch: int
    force: bool
    seed: int

    @property
    def parity_batches(self) -> list[int]:
        """The batch sizes parity is checked at."""
        # A second batch size proves the dynamic batch axis.
        return [1, self.parity_batch] if self.dynamic_batch and self.parity_batch != 1 else [1]


def _export_verified(model: nn.Module, path: Path, options: ExportJob) -> ParityReport:
    """Export into a private folder, check and verify there, and only then move the file into place."""
    with (
        atomic_file(path, options.force) as tmp,
        staging_dir(path) as work,
    ):
        # Stage under the final file name so any external-data reference already names the final file.
        staged = work / path.name
        exporter, reason, macs = _export_checked(model, staged, options)
        extra = sorted(p.name for p in work.iterdir() if p != staged)
        report = ParityReport(
            path=str(path),
            exporter=exporter,
            opset=opset_of(staged),
            input_shape=onnx_input_shape(staged),
            dynamic_batch=options.dynamic_batch,
            file_bytes=staged.stat().st_size,
            external_data=extra,
            atol=options.atol,
            rtol=options.rtol,
            checks=_parity_checks(model, staged, options),
            macs=macs,
            fallback_reason=reason,
        )
        _raise_unless_passed(report)
        # Weights over 2 GB travel beside the .onnx; move them first so the file never points at nothing.
        for name in extra:
            check_writable(path.parent / name, options.force)
            os.replace(work / name, path.parent / name)
        os.replace(staged, tmp)
    return report


def _export_checked(model: nn.Module, staged: Path, options: ExportJob) -> tuple[str, str | None, int]:
    """Export to ``staged``, store the model's MACs in it and run the ONNX checker: (exporter, fallback reason, MACs)."""
    big = _state_bytes(model) > _MAX_INLINE_BYTES
    exporter, reason = _export(model, staged, options.input_size, options.dynamic_batch, options.opset, big)
    macs = count_macs(model, options.input_size)
    set_metadata(staged, {MACS_METADATA_KEY: str(macs)})
    try:
        onnx.checker.check_model(str(staged), full_check=True)
    except Exception as e:  # the checker raises several types; all mean the same to the user
        raise ExportError(f"the exported file fails onnx.checker: {first_line(e, 300)}") from e
    return exporter, reason, macs


def _raise_unless_passed(report: ParityReport) -> None:
    if report.passed:
        return
    _raise_if_not_finite(report)
    # A difference, not a ratio: the tolerance may be 0 (--atol 0 --rtol 0).
    worst = max((c for c in report.checks if not c.passed), key=lambda c: c.max_abs_diff - c.tolerance)
    if worst.max_abs_diff <= worst.tolerance and len(worst.output_rel_diffs) > 1:  # one small output failed
        i = int(np.argmax(worst.output_rel_diffs))
        raise ParityError(f"ONNX parity failed: at batch {worst.batch} output {i} differs by "
                          f"{worst.output_rel_diffs[i]:.3g} of its own largest value (atol {report.atol:g}, rtol "
                          f"{report.rtol:g}); nothing written to {report.path}", report)
    raise ParityError(
        f"ONNX parity failed: at batch {worst.batch} max |onnx - torch| = {worst.max_abs_diff:.3g} > "
        f"tolerance {worst.tolerance:.3g} (atol {report.atol:g} + rtol {report.rtol:g} x max |logit| "
        f"{worst.max_abs_logit:.3g}); nothing written to {report.path} (loosen --atol/--rtol only if this "
        "difference is acceptable)",
        report,
    )


def _raise_if_not_finite(report: ParityReport) -> None:
    """A NaN or infinity is no tolerance question: say whose outputs hold it."""
    for c in report.checks:
        if not np.isfinite(c.max_abs_logit):
            whose = "the model's own (PyTorch) outputs hold"
        elif not np.isfinite(c.max_abs_diff):
            whose = "onnxruntime's outputs hold"
        else:
            continue
        raise ParityError(f"ONNX parity failed: at batch {c.batch} {whose} NaN or infinity; nothing written to "
                          f"{report.path} (no tolerance makes that pass: export a model whose outputs are finite)",
                          report)


def check_opset(opset: int | None) -> None:
    """Refuse an opset the exporters cannot write before any work starts.

    Args:
        opset: the opset asked for; None (the exporter's default) always passes.
    """
    low, high = supported_opsets()
    if opset is not None and not low <= opset <= high:
        raise SurgeryError(f"opset {opset} is not supported: choose one from {low} to {high}, or leave it out "
                           "for the exporter's default")


def supported_opsets() -> tuple[int, int]:
    """The opsets both torch's exporters and the installed onnx package can write.

    Returns:
        (lowest, highest).
    """
    from torch.onnx import _constants

    return _constants.ONNX_MIN_OPSET, min(_constants.ONNX_MAX_OPSET, onnx.defs.onnx_opset_version())


def _export(model, staged, input_size, dynamic_batch, opset, big) -> tuple[str, str | None]:
    """Try the dynamo exporter, then the TorchScript one; return (exporter, why dynamo failed)."""
    device = model_device(model)
    # Batch 2, not 1: torch.export specialises a size-1 dimension to the constant 1.
    example = torch.randn(2 if dynamic_batch else 1, *input_size, device=device)
    names = {"input_names": ["input"], "output_names": ["logits"], "opset_version": opset}
    # torch.export prints whole graphs to stderr when it fails: keep them for a success only.
    noise = io.StringIO()
    try:
        dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
        with contextlib.redirect_stderr(noise):
            torch.onnx.export(
                model,
                (example,),
                str(staged),
                dynamo=True,
                external_data=big,
                dynamic_shapes=dynamic_shapes,
                verbose=False,
                **names,
            )
        sys.stderr.write(noise.getvalue())
        return "dynamo", None
    except Exception as e:  # any failure of the new exporter is a reason to try the old one
        _refuse_data_dependent(model, e)
        reason = f"{type(e).__name__}: {first_line(e, 300)}"
    for p in staged.parent.iterdir():
        p.unlink()
    warnings.warn(
        f"dynamo ONNX export failed ({reason}); falling back to the TorchScript exporter", stacklevel=5
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            dynamic_axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
            torch.onnx.export(
                model, (example,), str(staged), dynamo=False, dynamic_axes=dynamic_axes, **names
            )
    except Exception as e:
        raise ExportError(
            f"could not export the model to ONNX: dynamo exporter: {reason}; TorchScript exporter: "
            f"{type(e).__name__}: {first_line(e, 300)}"
        ) from e
    return "torchscript", reason


def _refuse_data_dependent(model: nn.Module, error: BaseException) -> None:
    """A forward that branches on tensor values exports as one branch (the TorchScript tracer bakes in the
    one this input took): refuse it, naming the module and line, as `convert` does."""
    cause = error
    while cause is not None and type(cause).__name__ != "GuardOnDataDependentSymNode":
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return
    names = {id(m): name for name, m in model.named_modules()}
    where = "the model's forward"
    for frame, line in traceback.walk_tb(cause.__traceback__):
        module = frame.f_locals.get("self")
        if frame.f_code.co_name == "forward" and id(module) in names:
            label = names[id(module)] or "the model"
            where = f"{label} ({type(module).__name__}.forward, {Path(frame.f_code.co_filename).name}:{line})"
    raise ExportError(f"{where} branches on tensor values (data-dependent control flow): an ONNX graph would keep "
                      "only one branch; make that forward free of it (e.g. torch.where) before exporting") from None


def _parity_checks(model: nn.Module, staged: Path, options: ExportJob) -> list[ParityCheck]:
    session = onnx_session(staged, name="the exported file", error=ExportError)
    device = model_device(model)
    generator = torch.Generator().manual_seed(options.seed)
    checks = []
    for batch in options.parity_batches:
        x = torch.randn(batch, *options.input_size, generator=generator)
        with torch.no_grad():
            expected = [t.detach().float().cpu().numpy().astype(np.float64) for t in output_tensors(model(x.to(device)))]
        got = _run_onnx(session, x.numpy())
        if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
            raise ExportError(
                f"onnxruntime returns shapes {[g.shape for g in got]} but PyTorch returns "
                f"{[e.shape for e in expected]}"
            )
        diffs = [float(np.max(np.abs(g.astype(np.float64) - e))) for g, e in zip(got, expected)]
        scales = [float(np.max(np.abs(e))) for e in expected]
        max_abs_diff, max_abs_logit = max(diffs), max(scales)
        tolerance = options.atol + options.rtol * max_abs_logit
        # NaN compares false, so a NaN difference fails here too; each output must pass on its own scale.
        passed = (all(d <= options.atol + options.rtol * m for d, m in zip(diffs, scales))
                  and all(np.isfinite(g).all() for g in got))
        top1 = int((got[0].reshape(batch, -1).argmax(1) == expected[0].reshape(batch, -1).argmax(1)).sum())
        checks.append(
            ParityCheck(
                batch=batch,
                max_abs_diff=max_abs_diff,
                max_abs_logit=max_abs_logit,
                max_rel_diff=max_abs_diff / max_abs_logit if max_abs_logit > 0 else max_abs_diff,
                tolerance=tolerance,
                top1_agree=top1,
                passed=passed,
                output_rel_diffs=[d / m if m > 0 else d for d, m in zip(diffs, scales)],
            )
        )
    return checks


class OnnxModule(nn.Module):
    """An ONNX file run in onnxruntime (CPU) behind a torch module's forward: images in, first output out,
    so `evaluate` and `predict` score an exported (or int8) file exactly as they score a PyTorch model.

    Args:
        path: the .onnx file.
        threads: onnxruntime intra-op threads (None: every core).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        super().__init__()
        self.session = onnx_session(path, threads=threads)
        self.input = self.session.get_inputs()[0]
        # A static batch axis takes the images that many at a time.
        self.batch = self.input.shape[0] if isinstance(self.input.shape[0], int) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the file on ``x``.

        Args:
            x: a batch of images.

        Returns:
            The file's first output, as a CPU tensor.
        """
        x = x.detach().float().cpu().numpy()
        step = self.batch or len(x)
        if len(x) % step:
            raise SurgeryError(f"the ONNX file takes batches of {step}; {len(x)} images do not split into them")
        try:
            out = [self.session.run(None, {self.input.name: x[i : i + step]})[0] for i in range(0, len(x), step)]
        except Exception as e:  # onnxruntime's errors name the input and its expected shape
            raise SurgeryError(f"onnxruntime cannot run the images through the file: {first_line(e, 300)}") from e
        return torch.from_numpy(np.concatenate(out))


def _run_onnx(session, x: np.ndarray) -> list[np.ndarray]:
    return session.run(None, {session.get_inputs()[0].name: x})


def _state_bytes(model: nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
