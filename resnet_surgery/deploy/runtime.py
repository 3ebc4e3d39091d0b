"""One way to open an ONNX file in onnxruntime, for parity checks, scoring and timing alike."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import numpy as np
import onnxruntime as ort

from ..errors import SurgeryError, first_line

__all__ = ["onnx_session", "onnxruntime_errors", "providers", "runner"]


def onnx_session(model: str | os.PathLike | bytes, *, threads: int | None = None, timing: bool = False,
                 device: str = "cpu", name: str | None = None,
                 error: type[SurgeryError] = SurgeryError) -> ort.InferenceSession:
    """An onnxruntime session on ``model``; a file onnxruntime cannot load is a one-line ``error``.

    Args:
        model: an .onnx file, or a serialized model.
        threads: intra-op threads (None: onnxruntime's default, every core).
        timing: the settings latency is measured with: every graph optimisation, sequential execution, one
            inter-op thread and no spinning of idle threads.
        device: "cpu", or "cuda" (onnxruntime-gpu's CUDA execution provider, CPU as fallback).
        name: how the error names the model (default: its path; "the model" for bytes).
        error: the SurgeryError subclass raised when onnxruntime cannot load the model.

    Returns:
        The session.
    """
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if timing:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        # Without this, each idle session's threads spin on the cores the timed session needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    name = name or ("the model" if isinstance(model, bytes) else str(model))
    chosen = providers(device)
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=options,
                                    providers=chosen)
    except Exception as e:  # onnxruntime raises several types; all mean the file cannot be used
        raise error(f"onnxruntime cannot load {name}: {first_line(e, 300)}") from e


def providers(device: str) -> list[str]:
    """The execution providers for ``device``; cuda without onnxruntime-gpu is a one-line error.

    Args:
        device: "cpu" or "cuda".

    Returns:
        The providers, most preferred first.
    """
    if device != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SurgeryError(
            "--device cuda needs onnxruntime-gpu with the CUDA execution provider; this onnxruntime has "
            f"{ort.get_available_providers()} (pip install onnxruntime-gpu, or use --device cpu)"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def runner(session: ort.InferenceSession, feed: dict[str, np.ndarray], device: str = "cpu") -> Callable[[], None]:
    """A no-argument callable that runs the model once on ``feed``, for timing.

    Args:
        session: the session to run.
        feed: input name -> array.
        device: "cpu", or "cuda": inputs and outputs are bound on the GPU so host-device copies are not timed.

    Returns:
        The callable.
    """
    if device == "cpu":
        return lambda: session.run(None, feed)
    # IO binding keeps inputs and outputs on the GPU, so only the model's own work is timed.
    binding = session.io_binding()
    for name, value in feed.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for out in session.get_outputs():
        binding.bind_output(out.name, "cuda")

    def run():
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return run


@contextlib.contextmanager
def onnxruntime_errors(what: str):
    """Inside, onnxruntime's own exception types (a graph that loads but does not run, an input it refuses) are
    one SurgeryError: "onnxruntime could not <what>: <type>: <first line>".

    Args:
        what: what was being done, e.g. "run model.onnx on the calibration images".

    Raises:
        SurgeryError: what failed inside, in one line (a SurgeryError raised inside passes as it is).
    """
    try:
        yield
    except SurgeryError:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime raises many types; the first line says what went wrong
        raise SurgeryError(f"onnxruntime could not {what}: {type(e).__name__}: {first_line(e, 300)}") from e

