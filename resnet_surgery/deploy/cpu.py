"""The CPU's instruction-set extensions that decide how fast, and how exactly, int8 and fp32 kernels run.

x86 int8 kernels multiply uint8 activations by int8 weights. With AVX-512 VNNI (or AVX-VNNI, AMX) the
products are summed in 32 bits; with AVX2 alone (VPMADDUBSW) pairs of products are summed in 16 bits first
and saturate when the weights use all 8 bits, so the same int8 file can lose accuracy on an AVX2-only CPU
that it keeps on a VNNI one (onnxruntime's quantization docs). Every latency and parity result records them.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CPU_EXTENSIONS", "VNNI_EXTENSIONS", "cpu_extensions", "has_vnni", "range_note", "weight_range_warning"]

# The extensions that matter here, in the order reports list them.
CPU_EXTENSIONS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
# Any of these sums u8 x s8 products in 32 bits: full 8-bit weights do not saturate.
VNNI_EXTENSIONS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_extensions(cpuinfo: str | None = None) -> list[str]:
    """The extensions of CPU_EXTENSIONS that this CPU has (from /proc/cpuinfo's flags; empty where there is none).

    Args:
        cpuinfo: the text of /proc/cpuinfo (None: read this machine's).

    Returns:
        list: the extensions present, in CPU_EXTENSIONS order.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: nothing to say
            return []
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return [e for e in CPU_EXTENSIONS if e in flags]


def has_vnni(extensions: list[str]) -> bool:
    """Whether ``extensions`` include a 32-bit u8 x s8 dot product (VNNI or AMX).

    Args:
        extensions: from `cpu_extensions`.

    Returns:
        bool: True where full-range int8 weights cannot saturate.
    """
    return any(e in extensions for e in VNNI_EXTENSIONS)


def range_note(reduce_range: bool, extensions: list) -> str:
    """What an int8 file's weight range means on CPUs like this one, for its report.

    Args:
        reduce_range: whether the weights use 7 bits.
        extensions: the CPU's instruction-set extensions (``cpu_extensions()``).

    Returns:
        A clause starting with "; ".
    """
    if reduce_range:
        return "; 7-bit weights (reduce_range): holds on CPUs without VNNI too"
    if has_vnni(extensions):
        return "; full 8-bit weights: on a CPU without VNNI (AVX2 only) they may saturate: check parity there"
    return "; full 8-bit weights"


def weight_range_warning(quantization: dict | None, where: str, extensions: list[str] | None = None) -> str | None:
    """Whether an int8 file is safe on this CPU: a warning when its weights use all 8 bits (or it does not say)
    and this CPU has no VNNI, where its u8 x s8 sums can saturate; None otherwise.

    Args:
        quantization: the file's quantization record (its ``resnet_surgery.quantization`` metadata), or None.
        where: the file, for the message.
        extensions: this CPU's extensions (None: read them).

    Returns:
        The warning, or None.
    """
    extensions = cpu_extensions() if extensions is None else extensions
    if has_vnni(extensions) or (quantization or {}).get("reduce_range") is True:
        return None
    made = "with full 8-bit weights" if quantization else "by another tool (its weight range unknown)"
    return (f"{where} is int8 {made}, and this CPU has no VNNI ({' '.join(extensions) or 'no AVX2'}): its "
            "u8 x s8 sums may saturate here; re-quantize with 7-bit weights (the default, reduce_range) and "
            "check parity on this machine")
