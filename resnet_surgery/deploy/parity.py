"""What an ONNX export's parity check found: onnxruntime against PyTorch on random batches."""

from __future__ import annotations

import dataclasses

__all__ = ["ParityCheck", "ParityReport"]


@dataclasses.dataclass
class ParityCheck:
    """onnxruntime against PyTorch on one random batch."""

    batch: int
    max_abs_diff: float
    max_abs_logit: float
    max_rel_diff: float  # max_abs_diff / max_abs_logit
    tolerance: float  # atol + rtol * max_abs_logit
    top1_agree: int
    passed: bool
    # One relative difference per output (a feature pyramid's levels), each held to its own tolerance.
    output_rel_diffs: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ParityReport:
    """What was exported, by which exporter, and how closely onnxruntime matches PyTorch."""

    path: str
    exporter: str  # "dynamo" or "torchscript" (the fallback)
    opset: int
    input_shape: list  # ONNX input shape; the batch axis is a name when dynamic
    dynamic_batch: bool
    file_bytes: int
    external_data: list[str]  # weight files beside the .onnx (only for models over 2 GB)
    atol: float
    rtol: float
    checks: list[ParityCheck]
    macs: int | None = None  # per image, convolutions and matmuls (torch.utils.flop_counter)
    fallback_reason: str | None = None

    @property
    def passed(self) -> bool:
        """Whether every check passed (and there was one)."""
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def max_abs_diff(self) -> float:
        """The largest |onnx - torch| of all checks."""
        return max(c.max_abs_diff for c in self.checks)

    @property
    def max_rel_diff(self) -> float:
        """The largest relative difference of all checks."""
        return max(c.max_rel_diff for c in self.checks)

    def to_dict(self) -> dict:
        """The report as JSON-ready data.

        Returns:
            Its fields, ``passed``, ``max_abs_diff`` and ``max_rel_diff``.
        """
        d = dataclasses.asdict(self)
        d.update(passed=self.passed, max_abs_diff=self.max_abs_diff, max_rel_diff=self.max_rel_diff)
        return d

    def __str__(self) -> str:
        batch = "dynamic batch" if self.dynamic_batch else "static batch"
        lines = [
            f"ONNX export: {self.path} ({_human_bytes(self.file_bytes)}, opset {self.opset}, "
            f"{self.exporter} exporter, {batch}, input {self.input_shape})",
        ]
        if self.fallback_reason:
            lines.append(
                f"  the dynamo exporter failed ({self.fallback_reason}); used the TorchScript exporter"
            )
        lines.append(
            f"{'batch':>5}  {'max |diff|':>10}  {'max |logit|':>11}  {'rel diff':>9}  {'tolerance':>9}  "
            f"{'top-1 agree':>11}  result"
        )
        for c in self.checks:
            lines.append(
                f"{c.batch:>5}  {c.max_abs_diff:>10.2e}  {c.max_abs_logit:>11.3g}  {c.max_rel_diff:>9.2e}  "
                f"{c.tolerance:>9.2e}  {f'{c.top1_agree}/{c.batch}':>11}  {'pass' if c.passed else 'FAIL'}"
            )
        for c in self.checks:
            if len(c.output_rel_diffs) > 1:  # a feature pyramid: each level passes on its own scale
                lines.append(f"  batch {c.batch}, rel diff per output: "
                             + ", ".join(f"{d:.2e}" for d in c.output_rel_diffs))
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(
            f"parity: {verdict} (max |onnx - torch| <= atol {self.atol:g} + rtol {self.rtol:g} x max |logit|)"
        )
        return "\n".join(lines)


def _human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"
