"""int8 for the deploy path: onnxruntime's static quantization of an exported fp32 ONNX file, with statistical parity.

Quantization is ``onnxruntime.quantization.quantize_static`` (QDQ format, int8 weights per output channel, uint8
activations whose ranges come from calibration images run through the fp32 model), after onnxruntime's own
``quant_pre_process`` (shape inference and graph optimisation). Parity cannot be exact for int8, so it is
statistical: on held-out images that calibration never saw, the int8 file's top-1 agreement with the fp32
file and the mean KL(fp32 || int8) of their softmax outputs (and both top-1 accuracies when the images have
labels) for a classifier (one N x classes output); for any other file (segmentation maps, a feature pyramid) the
relative error ||int8 - fp32|| / ||fp32|| of each output, averaged over the images. Below ``min_agreement``, above
``max_output_error``, or with a NaN or infinity in any output, the int8 file is not kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..arguments import checked_arguments, with_overrides
from ..atomic import atomic_file, check_writable, staging_dir
from ..data import held_out_split, split_batch
from ..defaults import MAX_BATCH
from ..errors import SurgeryError
from ..recovery import evaluate
from ..utils import check_model, image_size
from .cpu import cpu_extensions
from .export import ExportOptions, OnnxModule, ParityError, export_onnx
from .onnxfile import (
    MACS_METADATA_KEY,
    QUANT_METADATA_KEY,
    input_info,
    load_onnx_header,
    metadata,
    set_metadata,
)
from .parity import ParityReport
from .quantize_report import MAX_OUTPUT_ERROR, QuantizationError, QuantReport
from .runtime import onnxruntime_errors

METHODS = ("minmax", "entropy", "percentile")
# uint8 activations x int8 weights (U8S8) is what x86 int8 kernels (VNNI's u8 x s8 dot product) take directly:
# ResNet-50 here ran at 0.33x fp32 with U8S8 against 0.88x with S8S8 activations (batch 1).
ACTIVATIONS = ("uint8", "int8")

__all__ = ["ACTIVATIONS", "MAX_OUTPUT_ERROR", "METHODS", "QUANT_METADATA_KEY", "QuantReport", "QuantizationError",
           "QuantizeOptions", "check_int8_images", "export_int8", "quantize_onnx"]


class _Reader(CalibrationDataReader):
    """onnxruntime's calibration reader over a DataLoader: one {input: images} feed per batch."""

    def __init__(self, loader: DataLoader, input_name: str, progress: bool):
        self.loader, self.input_name, self.progress = loader, input_name, progress
        self.rewind()

    def get_next(self) -> dict | None:
        """The next batch's feed, None after the last."""
        batch = next(self.batches, None)
        if batch is None:
            return None
        return {self.input_name: split_batch(batch)[0].float().numpy()}

    def rewind(self) -> None:
        """Start over at the first batch."""
        self.batches = iter(tqdm(self.loader, desc="int8 calibration", disable=not self.progress, leave=False))


def _check_images(loader: DataLoader, shape: list, fp32_onnx: Path | None = None) -> None:
    """Fail in one line when the images do not have the shape the file takes (e.g. a wrong --preset), or the
    fp32 file's outputs on them are not finite (no int8 file can follow a NaN; None: no file yet)."""
    images = split_batch(next(iter(loader)))[0]
    fixed = [(i, s) for i, s in enumerate(shape) if i > 0 and isinstance(s, int)]
    if images.dim() != len(shape) or any(images.shape[i] != s for i, s in fixed):
        raise SurgeryError(
            f"the calibration images are {list(images.shape[1:])} but the model takes {shape[1:]}; preprocess them "
            "to the model's input size (--preset, --size)"
        )
    if fp32_onnx is None:
        return
    session = OnnxModule(fp32_onnx).session
    with onnxruntime_errors(f"run {fp32_onnx} on the calibration images"):  # a graph that loads but does not run
        outputs = session.run(None, {session.get_inputs()[0].name: images.float().numpy()})
    if not all(np.isfinite(y).all() for y in outputs):
        raise SurgeryError(f"{fp32_onnx} gives NaN or infinity on the calibration images: there is nothing to "
                           "quantize; export a model whose outputs are finite")


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    """How `quantize_onnx` quantizes a file and checks the result.

    Args:
        per_channel: one weight scale per output channel (else per tensor).
        method: "minmax", "entropy" or "percentile": how activation ranges are calibrated.
        activations: "uint8" (U8S8, the fast form on x86) or "int8" (S8S8, for runtimes that want signed
            activations).
        reduce_range: 7-bit weights (the default), which CPUs without AVX-512 VNNI need: AVX2 sums u8 x s8
            pairs in 16 bits and saturates with full 8-bit weights; False: all 8 bits.
        num_images: calibration images (a fixed random subset).
        parity_data: images for parity, if not held out of the calibration data.
        parity_images: parity images.
        min_agreement: percent of parity images on which int8 and fp32 must pick the same class (classifiers).
        max_output_error: the largest mean ||int8 - fp32|| / ||fp32|| allowed per output (other files).
        batch_size: images per calibration and parity batch (a static batch axis takes its own).
        preset: the preprocessing of image folders without ``transform``.
        transform: the preprocessing of image folders.
        seed: seed of the image subsets.
    """

    per_channel: bool = True
    method: str = "minmax"
    activations: str = "uint8"
    reduce_range: bool = True
    num_images: int = 512
    parity_data: object = None
    parity_images: int = 512
    min_agreement: float = 98.0
    max_output_error: float = MAX_OUTPUT_ERROR
    batch_size: int = 32
    preset: str = "imagenet"
    transform: object = None
    seed: int = 0


@checked_arguments
def quantize_onnx(fp32_onnx: str | os.PathLike, out: str | os.PathLike, calibration_data, *,
                  options: QuantizeOptions | None = None, force: bool = False, progress: bool = True,
                  **overrides) -> QuantReport:
    """Quantize ``fp32_onnx`` to int8 at ``out`` and check it against the fp32 file on held-out images.

    Parity runs on held-out images, never the calibration images.

    Args:
        fp32_onnx: the float32 .onnx file.
        out: the int8 .onnx file to write.
        calibration_data: images to calibrate on (and to hold parity images out of, without ``parity_data``): an
            ImageFolder or flat folder (preprocessed with ``transform`` or ``preset``), a Dataset or a DataLoader.
        options: how to quantize and check (`QuantizeOptions`); None: its defaults.
        force: overwrite ``out`` if it exists.
        progress: show progress bars.
        **overrides: `QuantizeOptions` fields, e.g. ``quantize_onnx(a, b, images, method="entropy")``.

    Returns:
        The int8 report.

    Raises:
        QuantizationError: a classifier's agreement is below ``min_agreement`` percent, another output's error
            above ``max_output_error``, or an output of either file holds a NaN or an infinity (``.report``
            holds the figures); nothing is written.
        SurgeryError: an unknown method or activation type, a missing, unreadable or non-float32 input, ``out``
            the input itself or existing without ``force``, unusable images, or onnxruntime failing to run
            either file.
        TypeError: an argument or options field of the wrong type, or an unknown field.
    """
    o = with_overrides(QuantizeOptions, options, overrides, "quantize_onnx()")
    fp32_onnx, out = Path(fp32_onnx), Path(out)
    proto, (input_name, shape, _) = _check_request(fp32_onnx, out, o.method, o.activations, force)
    calibration, parity = _images(calibration_data, o)
    loaders = _loaders((calibration, parity), shape, o.batch_size)
    _check_images(loaders[0], shape, fp32_onnx)
    start = time.perf_counter()
    with atomic_file(out, force) as tmp, staging_dir(out) as work:
        staged = work / out.name
        _quantize(fp32_onnx, staged, _Reader(loaders[0], input_name, progress), o.per_channel, o.method,
                  o.activations, o.reduce_range)
        report = _parity(fp32_onnx, staged, loaders[1], out, o.method, o.per_channel, o.activations,
                         len(calibration), (o.min_agreement, o.max_output_error), time.perf_counter() - start,
                         progress)
        report = dataclasses.replace(report, reduce_range=o.reduce_range, cpu_extensions=cpu_extensions())
        _raise_unless_agrees(report)
        _stamp(staged, proto, report)
        os.replace(staged, tmp)
    return report


def _loaders(datasets, shape, batch_size: int) -> list[DataLoader]:
    """Calibration and parity loaders: a static batch axis takes exactly that many images per run."""
    batch = shape[0] if isinstance(shape[0], int) else batch_size
    return [DataLoader(d, batch_size=batch, drop_last=isinstance(shape[0], int)) for d in datasets]


def _check_request(fp32_onnx: Path, out: Path, method: str, activations: str, force: bool):
    """Refuse an unknown method or activation type, a missing, non-ONNX or non-float32 input and an unwritable
    ``out`` before any work; return the input's parsed header and its (name, shape, dtype)."""
    if method not in METHODS:
        raise SurgeryError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    if activations not in ACTIVATIONS:
        raise SurgeryError(f"unknown activation type {activations!r}; choose one of {', '.join(ACTIVATIONS)}")
    proto = load_onnx_header(fp32_onnx)
    if out.resolve() == fp32_onnx.resolve():
        raise SurgeryError(f"--out {out} is the fp32 input itself; write the int8 file under another name")
    check_writable(out, force)
    info = input_info(proto, fp32_onnx)
    if info[2] != np.float32:
        raise SurgeryError(f"{fp32_onnx} takes {info[2]} input; quantize a float32 model")
    return proto, info


def _stamp(staged: Path, proto, report: QuantReport) -> None:
    """Store in the int8 file the fp32 file's MACs and how it was quantized."""
    macs = {k: v for k, v in metadata(proto).items() if k == MACS_METADATA_KEY}
    summary = {k: v for k, v in report.to_dict().items() if k not in ("path", "fp32_path")}
    set_metadata(staged, {**macs, QUANT_METADATA_KEY: json.dumps(summary)})


def _raise_unless_agrees(report: QuantReport) -> None:
    if report.passed:
        return
    if not report.finite:
        raise QuantizationError(
            f"the int8 or fp32 file gives NaN or infinity on the {report.parity_images} held-out images; nothing "
            f"written to {report.path} (check that the fp32 model's outputs are finite)", report)
    if report.output_errors is not None:
        i = max(range(len(report.output_errors)), key=report.output_errors.__getitem__)
        raise QuantizationError(
            f"int8 output {i} differs from fp32 by {report.output_errors[i]:.3g} of its norm on "
            f"{report.parity_images} held-out images, above the bound {report.max_output_error:g}; nothing written "
            f"to {report.path} (calibrate on more, representative images, or try --method entropy or percentile)",
            report)
    raise QuantizationError(
        f"int8 agreement with fp32 is {report.agreement:.2f}% on {report.parity_images} held-out images, "
        f"below the minimum {report.min_agreement:g}%; nothing written to {report.path} (calibrate on more, "
        "representative images, try --method entropy or percentile, or lower --min-agreement)", report)


@checked_arguments
def export_int8(model, out: str | os.PathLike, calibration_data, *, input_size=(3, 224, 224),
                export: ExportOptions | None = None, options: QuantizeOptions | None = None, force: bool = False,
                on_fp32: Callable[[ParityReport], None] | None = None, progress: bool = True,
                **overrides) -> tuple[ParityReport, QuantReport]:
    """Export ``model`` to a verified fp32 ONNX file, then quantize that to int8 at ``out``.

    The fp32 file is staged beside ``out`` (under a name a later run removes if this one is killed) and
    removed at the end: only the int8 file is kept.

    Args:
        model: the model, as `export_onnx` takes it.
        out: the int8 .onnx file to write.
        calibration_data: images to calibrate on, as `quantize_onnx` takes them.
        input_size: (channels, height, width) of one image.
        export: how to export the fp32 file (`ExportOptions`); None: its defaults.
        options: how to quantize (`QuantizeOptions`); None: its defaults.
        force: overwrite ``out`` if it exists.
        on_fp32: called with the fp32 report once the fp32 file passed, before quantizing.
        progress: show progress bars.
        **overrides: `QuantizeOptions` fields (method, per_channel, min_agreement, transform, ...).

    Returns:
        (the fp32 parity report, the int8 report).

    Raises:
        ParityError: the fp32 file does not match PyTorch (``.report`` holds the figures); nothing is written.
        QuantizationError: the int8 file fails its parity (``.report`` holds the figures); nothing is written.
        ExportError: no exporter could export the model.
        SurgeryError: ``out`` exists without ``force``, unusable calibration images, or bad options.
        TypeError: an argument or options field of the wrong type, or an unknown field.
    """
    quantize = with_overrides(QuantizeOptions, options, overrides, "export_int8()")
    check_model(model)
    out = check_writable(out, force)
    check_int8_images(calibration_data, input_size, quantize)  # before the fp32 export, not after it
    with staging_dir(out) as work:
        try:
            fp32_report = export_onnx(model, work / "fp32.onnx", input_size=input_size, options=export, force=force)
        except ParityError as e:  # the fp32 file is a staged intermediate: name the file the user asked for
            e.report.path = str(out)
            raise ParityError(str(e).replace(str(work / "fp32.onnx"), str(out)), e.report) from None
        if on_fp32 is not None:
            on_fp32(fp32_report)
        int8_report = quantize_onnx(work / "fp32.onnx", out, calibration_data, options=quantize, force=force,
                                    progress=progress)
    return fp32_report, int8_report


def check_int8_images(calibration_data, input_size, options: QuantizeOptions) -> None:
    """The calibration and parity images `quantize_onnx` will take, split and sized as it will, checked up front.

    Args:
        calibration_data: the calibration images.
        input_size: the size the model is exported at.
        options: `quantize_onnx`'s options.

    Raises:
        SurgeryError: images that cannot be read, too few, or of another size than ``input_size``.
    """
    calibration, _ = _images(calibration_data, options)
    _check_images(DataLoader(calibration, batch_size=1), [1, *image_size(input_size)])


def _images(calibration_data, o: QuantizeOptions):
    """(calibration images, parity images): disjoint seeded subsets, after refusing sizes and bounds out of range."""
    if o.num_images < 1 or o.parity_images < 1 or not 0 <= o.seed < 2**63:
        raise SurgeryError(f"num_images and parity_images must be positive and seed from 0 to 2^63-1, got "
                           f"{o.num_images}, {o.parity_images} and {o.seed}")
    if not 1 <= o.batch_size <= MAX_BATCH:
        raise SurgeryError(f"batch_size takes an integer from 1 to {MAX_BATCH}, got {o.batch_size}")
    if not (0 <= o.min_agreement <= 100 and 0 <= o.max_output_error < math.inf):
        raise SurgeryError(f"min_agreement takes a percentage from 0 to 100 and max_output_error a finite number "
                           f">= 0, got {o.min_agreement} and {o.max_output_error}")
    return held_out_split(
        calibration_data, o.parity_data, keep=o.num_images, hold=o.parity_images, preset=o.preset,
        transform=o.transform, seed=o.seed,
        too_few="the calibration data has one image; int8 parity needs held-out images beside the "
                "calibration images: pass more images (or parity_data)")


def _quantize(fp32_onnx: Path, staged: Path, reader: _Reader, per_channel: bool, method: str, activations: str,
              reduce_range: bool) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    prepared = staged.with_name("prepared.onnx")
    try:
        quant_pre_process(str(fp32_onnx), str(prepared))
    except Exception:  # shape inference is an optimisation; quantization works without it
        prepared = fp32_onnx
    with onnxruntime_errors(f"quantize {fp32_onnx}"):
        quantize_static(str(prepared), str(staged), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8, reduce_range=reduce_range,
                        calibrate_method=methods[method])


def _is_classifier(session) -> bool:
    """One output of rank 2 (N x classes): top-1 agreement means something only then."""
    outputs = session.get_outputs()
    return len(outputs) == 1 and len(outputs[0].shape) == 2


def _output_errors(fp32, int8, loader, progress) -> tuple[list[float], int]:
    """Per output, the mean over images of ||int8 - fp32|| / ||fp32|| (NaN when either holds a NaN), and the
    images seen."""
    totals, n = None, 0
    for batch in tqdm(loader, desc="int8 parity", disable=not progress, leave=False):
        x = {fp32.get_inputs()[0].name: split_batch(batch)[0].float().numpy()}
        refs, ys = fp32.run(None, x), int8.run(None, x)
        per_output = []
        for y, r in zip(ys, refs):
            r64, d = r.reshape(len(r), -1).astype(np.float64), (y.astype(np.float64) - r).reshape(len(r), -1)
            per_output.append(float((np.linalg.norm(d, axis=1) / np.maximum(np.linalg.norm(r64, axis=1), 1e-12)).sum()))
        totals = per_output if totals is None else [t + e for t, e in zip(totals, per_output)]
        n += len(refs[0])
    if not n:
        raise SurgeryError("the parity data yielded no images")
    return [t / n for t in totals], n


def _parity(fp32_onnx, staged, loader, *args) -> QuantReport:
    with onnxruntime_errors(f"run {fp32_onnx} or its int8 file on the parity images"):
        return _measured_parity(fp32_onnx, staged, loader, *args)


def _measured_parity(fp32_onnx, staged, loader, out, method, per_channel, activations, calibration_images, bounds,
                     seconds, progress) -> QuantReport:
    fp32, int8 = OnnxModule(fp32_onnx), OnnxModule(staged)
    if not _is_classifier(fp32.session):
        errors, images = _output_errors(fp32.session, int8.session, loader, progress)
        return _report(fp32_onnx, staged, out, method, per_channel, activations, calibration_images, bounds, seconds,
                       images=images, output_errors=errors, finite=all(math.isfinite(e) for e in errors))
    scores = evaluate(int8, loader, reference=fp32, progress=progress)
    top1_fp32 = evaluate(fp32, loader, progress=progress).top1 if scores.top1 is not None else None
    # KL is NaN (or infinite) whenever either file's logits hold a NaN or an infinity
    return _report(fp32_onnx, staged, out, method, per_channel, activations, calibration_images, bounds, seconds,
                   images=scores.num_images, agreement=scores.agreement, kl=scores.kl, top1_fp32=top1_fp32,
                   top1_int8=scores.top1, finite=math.isfinite(scores.kl))


def _report(fp32_onnx, staged, out, method, per_channel, activations, calibration_images, bounds, seconds, *,
            images, agreement=None, kl=None, top1_fp32=None, top1_int8=None, output_errors=None,
            finite=True) -> QuantReport:
    return QuantReport(
        path=str(out),
        fp32_path=str(fp32_onnx),
        method=method,
        per_channel=per_channel,
        quant_format="QDQ",
        activations=activations,
        calibration_images=calibration_images,
        parity_images=images,
        agreement=agreement,
        kl=kl,
        top1_fp32=top1_fp32,
        top1_int8=top1_int8,
        min_agreement=bounds[0],
        fp32_bytes=fp32_onnx.stat().st_size,
        int8_bytes=staged.stat().st_size,
        seconds=seconds,
        output_errors=output_errors,
        max_output_error=bounds[1],
        finite=finite,
    )
