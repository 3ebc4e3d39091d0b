"""Deployment: ONNX export with parity, int8, latency in onnxruntime with its statistics, the machine it ran on.

Code outside this package imports from here, not from its modules."""


from .cpu import CPU_EXTENSIONS, VNNI_EXTENSIONS, cpu_extensions, has_vnni, range_note, weight_range_warning
from .export import (
    MACS_METADATA_KEY,
    ExportError,
    ExportOptions,
    OnnxModule,
    ParityError,
    check_opset,
    export_onnx,
    onnx_input_shape,
    onnx_metadata,
    supported_opsets,
)
from .latency import METHOD, LatencyOptions, LatencyReport, StoppingRule, check_batch_sizes, compare_latency
from .machine import BUSY_LOAD, cpu_model, load_warnings, machine_info, measure_peak_gflops, usable_cores
from .onnxfile import (
    QUANT_METADATA_KEY,
    input_info,
    is_quantized,
    load_onnx_header,
    metadata,
    opset,
    set_metadata,
    stored_macs,
)
from .parity import ParityCheck, ParityReport
from .plot import plot_latency
from .quantize import (
    ACTIVATIONS,
    MAX_OUTPUT_ERROR,
    METHODS,
    QuantizationError,
    QuantizeOptions,
    QuantReport,
    check_int8_images,
    export_int8,
    quantize_onnx,
)
from .runtime import onnx_session, onnxruntime_errors, providers, runner
from .stats import CI_WARN, RatioCI, ratio_ci, result_rows, summarize

__all__ = [
    "ACTIVATIONS", "BUSY_LOAD", "CI_WARN", "CPU_EXTENSIONS", "ExportError", "ExportOptions", "LatencyOptions", "LatencyReport",
    "MACS_METADATA_KEY", "MAX_OUTPUT_ERROR", "METHOD", "METHODS", "OnnxModule", "ParityCheck", "ParityError",
    "ParityReport", "QUANT_METADATA_KEY", "QuantReport", "QuantizationError", "QuantizeOptions", "RatioCI", "StoppingRule",
    "VNNI_EXTENSIONS", "check_batch_sizes", "check_int8_images", "check_opset", "compare_latency", "cpu_extensions",
    "cpu_model", "export_int8", "export_onnx", "has_vnni", "input_info", "is_quantized", "load_onnx_header",
    "load_warnings", "machine_info", "measure_peak_gflops", "metadata", "onnx_input_shape", "onnx_metadata",
    "onnx_session", "onnxruntime_errors", "opset", "plot_latency", "providers", "quantize_onnx", "range_note", "ratio_ci", "result_rows",
    "runner", "set_metadata", "stored_macs", "summarize", "supported_opsets", "usable_cores",
    "weight_range_warning",
]
