"""resnet-surgery: turn a pretrained ResNet into another downsampling variant and prove what that did."""

from .blocks import Block, Subsample, find_blocks, trace
from .data import BadImageError, as_loader, cifar10_tensors, extract_cifar10, split_batch
from .errors import NotExactError, SurgeryError, TraceError
from .export import ExportError, ParityError, ParityReport, export_onnx, onnx_input_shape
from .finetune import FinetuneReport, finetune
from .latency import LatencyReport, RatioCI, compare_latency, ratio_ci
from .models import load_model
from .prune import prune_dead_compute
from .recipe import apply_recipe, load, save
from .recovery import CalibrationReport, EvalReport, calibrate, evaluate, predict
from .report import Report, count_macs, inspect
from .rewrite import SurgeryNotice, convert, max_difference
from .zoo import CIFAR_MODELS, cifar_resnet, load_cifar_resnet

__all__ = [
    "BadImageError", "Block", "CIFAR_MODELS", "CalibrationReport", "EvalReport", "ExportError", "FinetuneReport",
    "LatencyReport", "NotExactError", "ParityError", "ParityReport", "RatioCI", "Report", "Subsample",
    "SurgeryError", "SurgeryNotice", "TraceError", "apply_recipe", "as_loader", "calibrate",
    "cifar10_tensors", "cifar_resnet", "compare_latency", "convert", "count_macs", "evaluate", "export_onnx",
    "extract_cifar10", "find_blocks", "finetune", "inspect", "load", "load_cifar_resnet", "load_model",
    "max_difference", "onnx_input_shape", "predict", "prune_dead_compute", "ratio_ci", "save", "split_batch",
    "trace",
]
