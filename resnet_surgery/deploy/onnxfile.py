"""Reading and annotating ONNX files: what export writes and latency reads (input, opset, stored MACs)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from ..arguments import checked_arguments
from ..errors import SurgeryError, first_line

__all__ = ["MACS_METADATA_KEY", "QUANT_METADATA_KEY", "input_info", "is_quantized", "load_onnx_header", "metadata", "onnx_input_shape",
           "onnx_metadata", "opset", "set_metadata", "stored_macs"]

MACS_METADATA_KEY = "resnet_surgery.macs"
QUANT_METADATA_KEY = "resnet_surgery.quantization"  # how quantize_onnx made an int8 file (JSON)


def load_onnx_header(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse an ONNX file without its external weights; SurgeryError when it is missing or not ONNX.

    Args:
        path: the .onnx file.

    Returns:
        The model proto (graph and metadata, no external weights).
    """
    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"no such ONNX file: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise SurgeryError(f"{path} is not an ONNX model ({first_line(e, 300)}); pass a .onnx file") from e
    if not proto.opset_import or not proto.graph.node:
        raise SurgeryError(f"{path} is not an ONNX model (no graph in it); pass a .onnx file")
    return proto


def input_info(proto: onnx.ModelProto, path) -> tuple[str, list, np.dtype]:
    """The model's one graph input that is not an initializer; SurgeryError when there are several.

    Args:
        proto: the parsed file.
        path: the file, for the error message.

    Returns:
        (name, shape, numpy dtype).
    """
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise SurgeryError(f"{path} has {len(inputs)} inputs; only single-input (image) models are supported")
    tensor_type = inputs[0].type.tensor_type
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
    except KeyError:  # a sequence, map or optional input, or an element type this onnx does not know
        raise SurgeryError(f"{path}'s input {inputs[0].name!r} is not a tensor of a known element type; only "
                           "models that take one image tensor are supported") from None
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]
    return inputs[0].name, shape, dtype


@checked_arguments
def onnx_input_shape(path: str | os.PathLike) -> list:
    """The shape of an ONNX model's single input.

    Args:
        path: the .onnx file.

    Returns:
        ints, or the axis name (None if unnamed) where an axis is dynamic.

    Raises:
        SurgeryError: no such file, a file that is not an ONNX model, or a model without exactly one input.
        TypeError: ``path`` is not a str or path.
    """
    return input_info(load_onnx_header(path), path)[1]


def onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's metadata_props (export_onnx stores the model's MACs there).

    Args:
        path: the .onnx file.

    Returns:
        key -> value.
    """
    return metadata(load_onnx_header(path))


def metadata(proto: onnx.ModelProto) -> dict[str, str]:
    """The metadata_props of a parsed file.

    Args:
        proto: the parsed file.

    Returns:
        key -> value.
    """
    return {p.key: p.value for p in proto.metadata_props}


def stored_macs(proto: onnx.ModelProto) -> int | None:
    """The MACs per image that export_onnx stored in the file, if any.

    Args:
        proto: the parsed file.

    Returns:
        The MACs, or None.
    """
    value = metadata(proto).get(MACS_METADATA_KEY, "")
    return int(value) if value.isdigit() else None


def is_quantized(proto: onnx.ModelProto) -> bool:
    """Whether the graph computes in int8 (QDQ pairs or QLinear/Integer operators).

    Args:
        proto: the parsed file.

    Returns:
        True for an int8 graph.
    """
    types = [n.op_type if isinstance(n.op_type, str) else str(n.op_type) for n in proto.graph.node]  # damaged: bytes
    return any(t in ("QuantizeLinear", "DynamicQuantizeLinear") or t.startswith("QLinear") or t.endswith("Integer")
               for t in types)


def set_metadata(path: Path, values: dict[str, str]) -> None:
    """Add or replace metadata_props; external weights stay where they are (only the graph is rewritten).

    Args:
        path: the .onnx file, rewritten in place.
        values: key -> value to set.
    """
    proto = onnx.load(str(path), load_external_data=False)
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in values.items():
        entry = existing.get(key) or proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def opset(path: str | os.PathLike) -> int:
    """The default-domain opset the file was written for.

    Args:
        path: the .onnx file.

    Returns:
        The opset version.
    """
    proto = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
