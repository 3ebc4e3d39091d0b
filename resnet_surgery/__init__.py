"""resnet-surgery: turn a pretrained ResNet into another downsampling variant and prove what that did.

The public API, imported on first use (PEP 562): ``import resnet_surgery`` and the command line's help and
argument errors stay well under a second, where importing torch, torchvision and onnx takes several.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Imported now: the function `history` shares its name with the submodule, and the submodule's first import
# would otherwise leave the package attribute pointing at the module.
from .history import History, Source, history

# name -> the module (under resnet_surgery) that defines it
_EXPORTS = {
    "as_loader": "data", "BadImageError": "data", "cifar10_tensors": "data", "extract_cifar10": "data",
    "DataSpec": "data", "model_transform": "data", "preprocessing": "data", "split_batch": "data",
    "export_onnx": "deploy.export", "ExportError": "deploy.export", "ExportOptions": "deploy.export",
    "OnnxModule": "deploy.export",
    "ParityError": "deploy.export",
    "compare_latency": "deploy.latency", "LatencyOptions": "deploy.latency", "LatencyReport": "deploy.latency",
    "onnx_input_shape": "deploy.onnxfile",
    "ParityReport": "deploy.parity",
    "export_int8": "deploy.quantize", "QuantizationError": "deploy.quantize", "quantize_onnx": "deploy.quantize",
    "QuantReport": "deploy.quantize", "QuantizeOptions": "deploy.quantize",
    "ratio_ci": "deploy.stats", "RatioCI": "deploy.stats",
    "Block": "engine.blocks", "find_blocks": "engine.blocks", "find_trunk": "engine.blocks",
    "trace": "engine.blocks", "Trunk": "engine.blocks",
    "count_macs": "engine.inspect", "inspect": "engine.inspect", "Report": "engine.inspect",
    "Subsample": "engine.layers",
    "max_difference": "engine.probe",
    "prune_dead_compute": "engine.prune",
    "ConvReads": "engine.reads", "grid_text": "engine.reads", "site_reads": "engine.reads",
    "SiteReads": "engine.reads",
    "plot_sites": "engine.reads_plot",
    "Options": "engine.recipe", "Recipe": "engine.recipe", "Rewrite": "engine.recipe",
    "convert": "engine.rewrite", "SurgeryNotice": "engine.rewrite",
    "transplant": "engine.transplant",
    "NotExactError": "errors", "SurgeryError": "errors", "TraceError": "errors",
    "History": "history", "history": "history", "Source": "history",
    "calibrate": "recovery.calibrate", "CalibrationReport": "recovery.calibrate",
    "CalibrateOptions": "recovery.options", "FinetuneOptions": "recovery.options",
    "EvalReport": "recovery.evaluate", "evaluate": "recovery.evaluate", "predict": "recovery.evaluate",
    "finetune": "recovery.finetune",
    "FinetuneReport": "recovery.finetune_report",
    "recover": "recovery.recover", "RecoverOptions": "recovery.recover",
    "RecoveryReport": "recovery.recover_report", "RecoveryStage": "recovery.recover_report",
    "apply_recipe": "store", "load": "store", "load_model": "store", "load_original": "store",
    "read_recipe": "store", "save": "store",
    "Layout": "vocab", "Op": "vocab", "Shortcut": "vocab", "Variant": "vocab",
    "Candidate": "workflows.explore", "explore": "workflows.explore", "ExploreOptions": "workflows.explore", "ExploreReport": "workflows.explore",
    "pareto_front": "workflows.explore",
    "run_pipeline": "workflows.pipeline", "RunOptions": "workflows.pipeline", "RunResult": "workflows.pipeline",
    "CIFAR_MODELS": "zoo.cifar", "cifar_resnet": "zoo.cifar", "load_cifar_resnet": "zoo.cifar",
}

__all__ = [  # the keys of _EXPORTS (a test checks)
    "apply_recipe", "as_loader", "BadImageError", "Block", "calibrate", "Candidate", "CalibrateOptions", "CalibrationReport", "cifar10_tensors",
    "CIFAR_MODELS", "cifar_resnet", "compare_latency", "convert", "ConvReads", "count_macs", "DataSpec", "EvalReport",
    "evaluate", "explore", "ExploreOptions", "ExploreReport", "export_int8", "export_onnx", "ExportError", "ExportOptions", "extract_cifar10",
    "find_blocks", "find_trunk", "finetune", "FinetuneOptions", "FinetuneReport", "grid_text", "History", "history", "inspect",
    "LatencyOptions", "LatencyReport", "Layout", "load", "load_cifar_resnet", "load_model", "load_original",
    "max_difference", "model_transform",
    "NotExactError", "onnx_input_shape", "OnnxModule", "Op", "Options", "pareto_front", "ParityError",
    "ParityReport", "plot_sites", "predict", "preprocessing", "prune_dead_compute", "QuantizationError", "quantize_onnx",
    "QuantizeOptions", "QuantReport", "ratio_ci", "RatioCI", "read_recipe", "Recipe", "recover", "RecoverOptions", "RecoveryReport",
    "RecoveryStage", "Report", "Rewrite", "run_pipeline", "RunOptions", "RunResult", "save", "Shortcut", "site_reads", "SiteReads", "Source", "split_batch",
    "Subsample", "SurgeryError", "SurgeryNotice", "trace", "TraceError", "transplant", "Trunk", "Variant",
]


def __getattr__(name: str):
    """Import a public name from its module on first use (and keep it)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # what editors and type checkers read
    from .data import (
        BadImageError,
        DataSpec,
        as_loader,
        cifar10_tensors,
        extract_cifar10,
        model_transform,
        preprocessing,
        split_batch,
    )
    from .deploy import (
        ExportError,
        ExportOptions,
        LatencyOptions,
        LatencyReport,
        OnnxModule,
        ParityError,
        ParityReport,
        QuantizationError,
        QuantizeOptions,
        QuantReport,
        RatioCI,
        compare_latency,
        export_int8,
        export_onnx,
        onnx_input_shape,
        quantize_onnx,
        ratio_ci,
    )
    from .engine import (
        Block,
        ConvReads,
        Options,
        Recipe,
        Report,
        Rewrite,
        SiteReads,
        Subsample,
        SurgeryNotice,
        Trunk,
        convert,
        count_macs,
        find_blocks,
        find_trunk,
        grid_text,
        inspect,
        max_difference,
        plot_sites,
        prune_dead_compute,
        site_reads,
        trace,
        transplant,
    )
    from .errors import NotExactError, SurgeryError, TraceError
    from .recovery import (
        CalibrateOptions,
        CalibrationReport,
        EvalReport,
        FinetuneOptions,
        FinetuneReport,
        RecoverOptions,
        RecoveryReport,
        RecoveryStage,
        calibrate,
        evaluate,
        finetune,
        predict,
        recover,
    )
    from .store import apply_recipe, load, load_model, load_original, read_recipe, save
    from .vocab import Layout, Op, Shortcut, Variant
    from .workflows import (
        Candidate,
        ExploreOptions,
        ExploreReport,
        RunOptions,
        RunResult,
        explore,
        pareto_front,
        run_pipeline,
    )
    from .zoo import CIFAR_MODELS, cifar_resnet, load_cifar_resnet
