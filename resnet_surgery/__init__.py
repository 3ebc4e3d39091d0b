"""resnet-surgery: turn a pretrained ResNet into another downsampling variant and prove what that did."""

from .data import BadImageError, as_loader, cifar10_tensors, extract_cifar10, model_transform, split_batch
from .deploy.export import ExportError, OnnxModule, ParityError, export_onnx
from .deploy.latency import LatencyReport, compare_latency
from .deploy.onnxfile import onnx_input_shape
from .deploy.parity import ParityReport
from .deploy.quantize import QuantizationError, QuantReport, export_int8, quantize_onnx
from .deploy.stats import RatioCI, ratio_ci
from .engine.blocks import Block, Trunk, find_blocks, find_trunk, trace
from .engine.inspect import Report, count_macs, inspect
from .engine.layers import Subsample
from .engine.probe import max_difference
from .engine.prune import prune_dead_compute
from .engine.reads import ConvReads, SiteReads, grid_text, site_reads
from .engine.reads_plot import plot_sites
from .engine.recipe import Options, Recipe, Rewrite
from .engine.rewrite import SurgeryNotice, convert
from .engine.transplant import transplant
from .errors import NotExactError, SurgeryError, TraceError
from .history import History, Source, history
from .recovery.calibrate import CalibrationReport, calibrate
from .recovery.evaluate import EvalReport, evaluate, predict
from .recovery.finetune import finetune
from .recovery.finetune_report import FinetuneReport
from .store import apply_recipe, load, load_model, read_recipe, save
from .vocab import Layout, Op, Shortcut, Variant
from .workflows.explore import ExploreReport, explore, pareto_front
from .zoo.cifar import CIFAR_MODELS, cifar_resnet, load_cifar_resnet

__all__ = [
    "BadImageError", "Block", "CIFAR_MODELS", "CalibrationReport", "ConvReads", "EvalReport", "ExploreReport", "ExportError",
    "FinetuneReport", "History", "LatencyReport", "Layout", "NotExactError", "OnnxModule", "Op", "Options",
    "ParityError", "ParityReport", "QuantReport", "QuantizationError", "RatioCI", "Recipe", "Report", "Rewrite",
    "Shortcut", "SiteReads", "Source", "Subsample", "SurgeryError", "SurgeryNotice", "TraceError", "Trunk", "Variant", "apply_recipe",
    "as_loader", "calibrate", "cifar10_tensors", "cifar_resnet", "compare_latency", "convert", "count_macs",
    "evaluate", "explore", "export_int8", "export_onnx", "extract_cifar10", "find_blocks", "find_trunk", "finetune", "grid_text", "history", "inspect", "load",
    "load_cifar_resnet", "load_model", "max_difference", "model_transform", "onnx_input_shape", "pareto_front",
    "plot_sites", "predict", "prune_dead_compute", "quantize_onnx", "ratio_ci", "read_recipe", "save", "site_reads", "split_batch", "trace",
    "transplant",
]
