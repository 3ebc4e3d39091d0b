"""int8 for the deploy path: onnxruntime's static quantization of an exported fp32 ONNX file, with statistical parity.

Quantization is ``onnxruntime.quantization.quantize_static`` (QDQ format, int8 weights per output channel, 7 bits
of them by default (``reduce_range``: exact on every x86 CPU, see `cpu`), uint8 activations whose ranges come from calibration images run through the fp32 model), after onnxruntime's own
``quant_pre_process`` (shape inference and graph optimisation). Parity cannot be exact for int8, so it is
statistical: on held-out images that calibration never saw, the int8 file's top-1 agreement with the fp32
file and the mean KL(fp32 || int8) of their softmax outputs (and both top-1 accuracies when the images have
labels). Below ``min_agreement`` the int8 file is not kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..atomic import atomic_file, check_writable, temp_prefix
from ..data import as_dataset, disjoint_subsets, split_batch
from ..errors import SurgeryError, first_line
from ..recovery.evaluate import evaluate
from .cpu import cpu_extensions, has_vnni
from .export import OnnxModule, ParityError
from .onnxfile import MACS_METADATA_KEY, input_info, load_onnx_header, metadata, set_metadata

METHODS = ("minmax", "entropy", "percentile")
# uint8 activations x int8 weights (U8S8) is what x86 int8 kernels (VNNI's u8 x s8 dot product) take directly:
# ResNet-50 here ran at 0.33x fp32 with U8S8 against 0.88x with S8S8 activations (batch 1).
ACTIVATIONS = ("uint8", "int8")
QUANT_METADATA_KEY = "resnet_surgery.quantization"


class QuantizationError(ParityError):
    """int8 parity failed: the int8 file disagrees with the fp32 file more than allowed; ``.report`` (a
    QuantReport) has the figures."""


@dataclasses.dataclass
class QuantReport:
    """How an int8 file was made and how closely it follows its fp32 source on held-out images."""

    path: str
    fp32_path: str
    method: str
    per_channel: bool
    quant_format: str  # "QDQ"
    activations: str  # "uint8" (U8S8, the fast one on x86) or "int8" (S8S8); weights are always int8
    calibration_images: int
    parity_images: int  # held-out images, disjoint from the calibration images
    agreement: float  # percent of parity images where int8 and fp32 pick the same class
    kl: float  # mean KL(fp32 || int8) of the softmax outputs, nats
    top1_fp32: float | None  # percent, when the parity images have labels
    top1_int8: float | None
    min_agreement: float
    fp32_bytes: int
    int8_bytes: int
    seconds: float
    reduce_range: bool = True  # 7-bit weights: no u8 x s8 saturation on CPUs without VNNI (AVX2), same U8S8 speed
    cpu_extensions: list = dataclasses.field(default_factory=list)  # of the CPU the parity ran on

    @property
    def passed(self) -> bool:
        return self.agreement >= self.min_agreement

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "passed": self.passed}

    def __str__(self) -> str:
        top1 = ""
        if self.top1_int8 is not None:
            top1 = f", top-1 {self.top1_fp32:.2f}% fp32 -> {self.top1_int8:.2f}% int8"
        return "\n".join([
            f"int8: {self.path} ({self.int8_bytes / 1e6:.1f} MB, fp32 {self.fp32_bytes / 1e6:.1f} MB), onnxruntime static "
            f"{self.quant_format}, {'per-channel' if self.per_channel else 'per-tensor'} int8 weights, {self.activations} "
            f"activations, {self.method} "
            f"calibration on {self.calibration_images} images ({self.seconds:.1f} s)",
            f"parity on {self.parity_images} held-out images: agreement with fp32 {self.agreement:.2f}%, "
            f"KL {self.kl:.4f}{top1}",
            f"int8 parity: {'PASS' if self.passed else 'FAIL'} (agreement >= {self.min_agreement:g}%) on a CPU with "
            f"{' '.join(self.cpu_extensions) or 'no AVX2'}" + _range_note(self.reduce_range, self.cpu_extensions),
        ])


def _range_note(reduce_range: bool, extensions: list) -> str:
    if reduce_range:
        return "; 7-bit weights (reduce_range): holds on CPUs without VNNI too"
    if has_vnni(extensions):
        return "; full 8-bit weights: on a CPU without VNNI (AVX2 only) they may saturate: check parity there"
    return "; full 8-bit weights"


class _Reader(CalibrationDataReader):
    """onnxruntime's calibration reader over a DataLoader: one {input: images} feed per batch."""

    def __init__(self, loader: DataLoader, input_name: str, progress: bool):
        self.loader, self.input_name, self.progress = loader, input_name, progress
        self.rewind()

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        if batch is None:
            return None
        return {self.input_name: split_batch(batch)[0].float().numpy()}

    def rewind(self) -> None:
        self.batches = iter(tqdm(self.loader, desc="int8 calibration", disable=not self.progress, leave=False))


def _check_images(loader: DataLoader, shape: list) -> None:
    """Fail in one line when the images do not have the shape the file takes (e.g. a wrong --preset)."""
    images = split_batch(next(iter(loader)))[0]
    fixed = [(i, s) for i, s in enumerate(shape) if i > 0 and isinstance(s, int)]
    if images.dim() != len(shape) or any(images.shape[i] != s for i, s in fixed):
        raise SurgeryError(
            f"the calibration images are {list(images.shape[1:])} but the model takes {shape[1:]}; preprocess them "
            "to the model's input size (--preset, --size)"
        )


def quantize_onnx(
    fp32_onnx: str | os.PathLike,
    out: str | os.PathLike,
    calibration_data,
    *,
    per_channel: bool = True,
    method: str = "minmax",
    activations: str = "uint8",
    reduce_range: bool = True,
    num_images: int = 512,
    parity_data=None,
    parity_images: int = 512,
    min_agreement: float = 98.0,
    batch_size: int = 32,
    preset: str = "imagenet",
    transform=None,
    force: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> QuantReport:
    """Quantize ``fp32_onnx`` to int8 at ``out`` and check it against the fp32 file on held-out images.

    ``calibration_data`` (an ImageFolder or flat folder, a Dataset or a DataLoader; preprocessed with
    ``transform`` or ``preset`` like every other input of the project) gives ``num_images`` calibration images.
    Parity runs on ``parity_images`` of ``parity_data``, or, without it, on as many other images of
    ``calibration_data`` (never the calibration images). Raises QuantizationError, writing nothing, when
    the agreement is below ``min_agreement`` percent. ``activations="uint8"`` (U8S8) is the fast form on x86;
    "int8" (S8S8) is for runtimes that want signed activations. ``reduce_range``: 7-bit weights, which CPUs
    without AVX-512 VNNI need (AVX2 sums u8 x s8 pairs in 16 bits, saturating with 8); False: all 8 bits.
    """
    if method not in METHODS:
        raise SurgeryError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    if activations not in ACTIVATIONS:
        raise SurgeryError(f"unknown activation type {activations!r}; choose one of {', '.join(ACTIVATIONS)}")
    fp32_onnx, out = Path(fp32_onnx), Path(out)
    proto = load_onnx_header(fp32_onnx)
    if out.resolve() == fp32_onnx.resolve():
        raise SurgeryError(f"--out {out} is the fp32 input itself; write the int8 file under another name")
    check_writable(out, force)
    input_name, shape, dtype = input_info(proto, fp32_onnx)
    if dtype != np.float32:
        raise SurgeryError(f"{fp32_onnx} takes {dtype} input; quantize a float32 model")
    calibration, parity = _split(calibration_data, parity_data, num_images, parity_images, preset, transform, seed)
    # A static batch axis takes exactly that many images per run.
    batch = shape[0] if isinstance(shape[0], int) else batch_size
    loaders = [DataLoader(d, batch_size=batch, drop_last=isinstance(shape[0], int)) for d in (calibration, parity)]
    _check_images(loaders[0], shape)
    start = time.perf_counter()
    with (
        atomic_file(out, force) as tmp,
        tempfile.TemporaryDirectory(prefix=temp_prefix(out), suffix=".export", dir=out.parent) as work,
    ):
        staged = Path(work) / out.name
        _quantize(fp32_onnx, staged, _Reader(loaders[0], input_name, progress), per_channel, method, activations,
                  reduce_range)
        seconds = time.perf_counter() - start
        report = _parity(fp32_onnx, staged, loaders[1], out, method, per_channel, activations, len(calibration),
                         min_agreement, seconds, progress, reduce_range)
        if not report.passed:
            raise QuantizationError(
                f"int8 agreement with fp32 is {report.agreement:.2f}% on {report.parity_images} held-out images, "
                f"below the minimum {min_agreement:g}%; nothing written to {out} (calibrate on more, representative "
                "images, try --method entropy or percentile, or lower --min-agreement)",
                report,
            )
        macs = {k: v for k, v in metadata(proto).items() if k == MACS_METADATA_KEY}
        summary = {k: v for k, v in report.to_dict().items() if k not in ("path", "fp32_path")}
        set_metadata(staged, {**macs, QUANT_METADATA_KEY: json.dumps(summary)})
        os.replace(staged, tmp)
    return report


def _split(calibration_data, parity_data, num_images, parity_images, preset, transform, seed):
    """(calibration images, parity images): disjoint seeded subsets."""
    if num_images < 1 or parity_images < 1:
        raise SurgeryError("num_images and parity_images must be positive")
    dataset = as_dataset(calibration_data, preset=preset, transform=transform)
    if parity_data is not None:
        calibration, = disjoint_subsets(dataset, [num_images], seed)
        parity, = disjoint_subsets(as_dataset(parity_data, preset=preset, transform=transform), [parity_images], seed)
        return calibration, parity
    if len(dataset) < 2:
        raise SurgeryError("the calibration data has one image; int8 parity needs held-out images beside the "
                           "calibration images: pass more images (or parity_data)")
    # Hold out parity images first, so a small folder still leaves both sides some images.
    parity, calibration = disjoint_subsets(dataset, [min(parity_images, len(dataset) // 2), num_images], seed)
    return calibration, parity


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
    try:
        quantize_static(str(prepared), str(staged), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8, reduce_range=reduce_range,
                        calibrate_method=methods[method])
    except SurgeryError:
        raise
    except Exception as e:  # onnxruntime raises many types; the first line says what went wrong
        raise SurgeryError(f"onnxruntime could not quantize {fp32_onnx}: {type(e).__name__}: {first_line(e, 300)}") from e


def _parity(fp32_onnx, staged, loader, out, method, per_channel, activations, calibration_images, min_agreement,
            seconds, progress, reduce_range) -> QuantReport:
    fp32, int8 = OnnxModule(fp32_onnx), OnnxModule(staged)
    scores = evaluate(int8, loader, reference=fp32, progress=progress)
    top1_fp32 = evaluate(fp32, loader, progress=progress).top1 if scores.top1 is not None else None
    return QuantReport(
        path=str(out),
        fp32_path=str(fp32_onnx),
        method=method,
        per_channel=per_channel,
        quant_format="QDQ",
        activations=activations,
        calibration_images=calibration_images,
        parity_images=scores.num_images,
        agreement=scores.agreement,
        kl=scores.kl,
        top1_fp32=top1_fp32,
        top1_int8=scores.top1,
        min_agreement=min_agreement,
        fp32_bytes=fp32_onnx.stat().st_size,
        int8_bytes=staged.stat().st_size,
        seconds=seconds,
        reduce_range=reduce_range,
        cpu_extensions=cpu_extensions(),
    )
