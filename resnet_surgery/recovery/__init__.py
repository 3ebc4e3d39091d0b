"""Recovering what an approximate rewrite lost: evaluate, BatchNorm re-estimation, calibrate (block reconstruction), finetune (distillation), recover (the stages to a target within a budget).

Code outside this package imports from here, not from its modules."""


from .activations import capture, execution_order, named_module, run_hooked, submodule
from .batches import CACHE_BYTES, Batches, first_images, select_batches
from .batchnorm import reestimate_bn
from .budget import expired, time_limit
from .calibrate import (
    BN_WORK,
    CALIBRATION_STEPS,
    DEFAULT_STEPS,
    MEASURE_MIN,
    CalibrationReport,
    CalibrationStep,
    approximate_rewrites,
    calibrate,
    check_steps,
)
from .checkpoint import load_checkpoint, run_identity, save_checkpoint
from .crops import CROP_MARGIN, RECONSTRUCT_CROP, Crop, crop_plan
from .distill import (
    AUGMENTATIONS,
    AUTO_CIFAR_SIZE,
    Taps,
    augmenter,
    distillation_loss,
    feature_loss,
    features_text,
    global_pool,
    global_pools,
    training_loss,
)
from .distributed import join_process_group, sync_buffers, train_loader
from .evaluate import (
    EvalReport,
    Scores,
    check_label_classes,
    dataset_classes,
    evaluate,
    gives_logits,
    output_error,
    predict,
    score,
)
from .finetune import FREEZE, OBJECTIVES, OPTIMIZERS, finetune
from .finetune_report import FinetuneReport
from .guard import GUARD_IMAGES, guard_images, keep_better, objective_error
from .options import CalibrateOptions, FinetuneOptions
from .reconstruct import (
    HOLD_BACK,
    RECONSTRUCT_BATCH,
    RECONSTRUCT_BYTES,
    RECONSTRUCT_CHECKS,
    RECONSTRUCT_ITERATIONS,
    RECONSTRUCT_LR,
    RECONSTRUCT_WORK,
    BlockFit,
    held_back,
    macs_per_image,
    previous_blocks,
    reconstruct_blocks,
)
from .recover import (
    EVAL_IMAGES,
    MIN_GAIN,
    RECOVER_STAGES,
    RecoverOptions,
    check_stages,
    check_target_and_budget,
    recover,
)
from .recover_inputs import check_budget
from .recover_report import RecoveryReport, RecoveryStage, format_seconds
from .recover_state import load_state, save_state
from .refit import MAX_ROWS_PER_BATCH, UNFOLD_BYTES, ConvFit, transfer_weights

__all__ = [
    "AUGMENTATIONS", "AUTO_CIFAR_SIZE", "BN_WORK", "Batches", "BlockFit", "CACHE_BYTES", "CALIBRATION_STEPS",
    "CROP_MARGIN", "CalibrateOptions", "CalibrationReport", "CalibrationStep", "ConvFit", "Crop", "DEFAULT_STEPS",
    "EVAL_IMAGES", "EvalReport", "FREEZE", "FinetuneOptions", "FinetuneReport", "GUARD_IMAGES", "HOLD_BACK",
    "MAX_ROWS_PER_BATCH", "MEASURE_MIN", "MIN_GAIN", "OBJECTIVES", "OPTIMIZERS", "RECONSTRUCT_BATCH",
    "RECONSTRUCT_BYTES", "RECONSTRUCT_CHECKS", "RECONSTRUCT_CROP", "RECONSTRUCT_ITERATIONS", "RECONSTRUCT_LR",
    "RECONSTRUCT_WORK", "RECOVER_STAGES", "RecoverOptions", "RecoveryReport", "RecoveryStage", "Scores", "Taps",
    "UNFOLD_BYTES", "approximate_rewrites", "augmenter", "calibrate", "capture", "check_budget",
    "check_label_classes", "check_stages", "check_steps", "check_target_and_budget", "crop_plan", "dataset_classes",
    "distillation_loss", "evaluate", "execution_order", "expired", "feature_loss", "features_text", "finetune",
    "first_images", "format_seconds", "gives_logits", "global_pool", "global_pools", "guard_images", "held_back",
    "join_process_group", "keep_better", "load_checkpoint", "load_state", "macs_per_image", "named_module",
    "objective_error", "output_error", "predict", "previous_blocks", "reconstruct_blocks", "recover",
    "reestimate_bn", "run_hooked", "run_identity", "save_checkpoint", "save_state", "score", "select_batches",
    "submodule", "sync_buffers", "time_limit", "train_loader", "training_loss", "transfer_weights",
]
