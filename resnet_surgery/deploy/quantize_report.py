"""What int8 quantization did and how the int8 file compares with its fp32 file: `QuantReport`, and the
error raised when parity fails."""

from __future__ import annotations

import dataclasses

from .cpu import range_note
from .export import ParityError

__all__ = ["MAX_OUTPUT_ERROR", "QuantReport", "QuantizationError"]

# The bound on each non-classifier output's relative error: int8 ResNet trunks land at a few percent.
MAX_OUTPUT_ERROR = 0.1


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
    agreement: float | None  # classifiers: percent of parity images where int8 and fp32 pick the same class
    kl: float | None  # classifiers: mean KL(fp32 || int8) of the softmax outputs, nats
    top1_fp32: float | None  # percent, when the parity images have labels
    top1_int8: float | None
    min_agreement: float
    fp32_bytes: int
    int8_bytes: int
    seconds: float
    # Other outputs: per output, the mean over images of ||int8 - fp32|| / ||fp32|| (None for a classifier).
    output_errors: list[float] | None = None
    max_output_error: float = MAX_OUTPUT_ERROR
    finite: bool = True  # no NaN or infinity in any output of either file
    reduce_range: bool = True  # 7-bit weights: no u8 x s8 saturation on CPUs without VNNI (AVX2), same U8S8 speed
    cpu_extensions: list = dataclasses.field(default_factory=list)  # of the CPU the parity ran on

    @property
    def passed(self) -> bool:
        """Whether every output is finite and the agreement reaches ``min_agreement`` (classifiers) or every
        output's relative error stays within ``max_output_error`` (other outputs)."""
        if not self.finite:
            return False
        if self.output_errors is not None:
            return max(self.output_errors) <= self.max_output_error
        return self.agreement >= self.min_agreement

    def to_dict(self) -> dict:
        """The report as JSON-ready data.

        Returns:
            Its fields and ``passed``.
        """
        return {**dataclasses.asdict(self), "passed": self.passed}

    def __str__(self) -> str:
        return "\n".join([
            f"int8: {self.path} ({self.int8_bytes / 1e6:.1f} MB, fp32 {self.fp32_bytes / 1e6:.1f} MB), onnxruntime static "
            f"{self.quant_format}, {'per-channel' if self.per_channel else 'per-tensor'} int8 weights, {self.activations} "
            f"activations, {self.method} "
            f"calibration on {self.calibration_images} images ({self.seconds:.1f} s)",
            *self._parity_lines(),
            f"parity ran on a CPU with {' '.join(self.cpu_extensions) or 'no AVX2'}"
            + range_note(self.reduce_range, self.cpu_extensions),
        ])

    def _parity_lines(self) -> list[str]:
        verdict = "PASS" if self.passed else "FAIL"
        finite = "" if self.finite else " (NaN or infinity in the outputs)"
        if self.output_errors is not None:
            errors = ", ".join(f"{e:.2e}" for e in self.output_errors)
            return [f"parity on {self.parity_images} held-out images: ||int8 - fp32|| / ||fp32|| per output {errors}",
                    f"int8 parity: {verdict}{finite} (every output's relative error <= {self.max_output_error:g})"]
        top1 = ""
        if self.top1_int8 is not None:
            top1 = f", top-1 {self.top1_fp32:.2f}% fp32 -> {self.top1_int8:.2f}% int8"
        return [f"parity on {self.parity_images} held-out images: agreement with fp32 {self.agreement:.2f}%, "
                f"KL {self.kl:.4f}{top1}",
                f"int8 parity: {verdict}{finite} (agreement >= {self.min_agreement:g}%)"]
