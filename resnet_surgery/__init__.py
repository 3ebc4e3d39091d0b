"""resnet-surgery: turn a pretrained ResNet into another downsampling variant and prove what that did."""

from .blocks import Block, Subsample, Trunk, find_blocks, find_trunk, trace
from .data import BadImageError, as_loader, cifar10_tensors, extract_cifar10, model_transform, split_batch
from .errors import NotExactError, SurgeryError, TraceError
from .explore import ExploreReport, explore, pareto_front
from .export import ExportError, OnnxModule, ParityError, ParityReport, export_onnx
from .finetune import FinetuneReport, finetune
from .history import History, Source, history
from .latency import LatencyReport, RatioCI, compare_latency, ratio_ci
from .onnxfile import onnx_input_shape
from .prune import prune_dead_compute
from .quantize import QuantizationError, QuantReport, quantize_onnx
from .recipe import Options, Recipe, Rewrite, apply_recipe, load, load_model, read_recipe, save
from .recovery import CalibrationReport, EvalReport, calibrate, evaluate, predict
from .report import Report, count_macs, inspect
from .rewrite import SurgeryNotice, convert, max_difference
from .transplant import transplant
from .vocab import Layout, Op, Shortcut, Variant
from .zoo import CIFAR_MODELS, cifar_resnet, load_cifar_resnet

__all__ = [
    "BadImageError", "Block", "CIFAR_MODELS", "CalibrationReport", "EvalReport", "ExploreReport", "ExportError",
    "FinetuneReport", "History", "LatencyReport", "Layout", "NotExactError", "OnnxModule", "Op", "Options",
    "ParityError", "ParityReport", "QuantReport", "QuantizationError", "RatioCI", "Recipe", "Report", "Rewrite",
    "Shortcut", "Source", "Subsample", "SurgeryError", "SurgeryNotice", "TraceError", "Trunk", "Variant", "apply_recipe",
    "as_loader", "calibrate", "cifar10_tensors", "cifar_resnet", "compare_latency", "convert", "count_macs",
    "evaluate", "explore", "export_onnx", "extract_cifar10", "find_blocks", "find_trunk", "finetune", "history", "inspect", "load",
    "load_cifar_resnet", "load_model", "max_difference", "model_transform", "onnx_input_shape", "pareto_front",
    "predict", "prune_dead_compute", "quantize_onnx", "ratio_ci", "read_recipe", "save", "split_batch", "trace",
    "transplant",
]
