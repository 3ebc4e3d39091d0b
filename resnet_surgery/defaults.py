"""Numbers the library and the command line share, in a module that imports nothing: the command line reads
them for its help text without importing torch (which takes seconds)."""

from __future__ import annotations

__all__ = ["EVAL_IMAGES", "EXPLORE_STAGES", "MAX_BATCH", "MAX_LR", "MAX_STEPS", "RECONSTRUCT_ITERATIONS", "RECONSTRUCT_LR", "RECOVER_STAGES"]

RECONSTRUCT_ITERATIONS = 500  # optimizer steps per rewritten block (fewer where the block's MACs make that minutes)
RECONSTRUCT_LR = 3e-2  # reconstruction's peak rate, relative to each parameter tensor's RMS
RECOVER_STAGES = ("bn", "calibrate", "features", "finetune")  # recover's stages, in the order they run
EVAL_IMAGES = 2000  # recover's held-back images: the paired gap's noise is about sqrt(disagreements) / n
# explore's recover stages for every candidate unless told otherwise: calibration, the step that pays for every
# rewrite (README, "What recovery costs"); --budget/--target and more stages buy the rest
EXPLORE_STAGES = ("bn", "calibrate")
# a learning rate (or weight decay) above this is a typo, and far above it overflows float32 in the optimizer
MAX_LR = 10.0
# a batch beyond this is a typo (its input alone would take gigabytes), and a count of optimizer steps or
# passes beyond this one would outlive the machine; both far beyond them overflow C integers
MAX_BATCH = 65536
MAX_STEPS = 10**9
