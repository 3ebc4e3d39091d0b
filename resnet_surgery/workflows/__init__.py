"""Whole jobs: run (convert -> recover -> export -> time) and explore (which variant to deploy).

Code outside this package imports from here, not from its modules."""


from .explore import (
    ONNX_FILE,
    RESULT_FILE,
    VARIANTS,
    Candidate,
    ExploreOptions,
    ExploreReport,
    check_explore_out,
    explore,
    pareto_front,
)
from .explore_inputs import (
    check_candidates_folder,
    check_explore_request,
    explore_options,
    reusable_result,
    saved_model,
)
from .explore_plot import plot_explore
from .pipeline import Conversion, RunOptions, RunResult, convert_model, run_pipeline, run_summary

__all__ = [
    "Candidate", "Conversion", "ExploreOptions", "ExploreReport", "ONNX_FILE", "RESULT_FILE", "RunOptions", "RunResult", "VARIANTS",
    "check_candidates_folder", "check_explore_out", "check_explore_request", "convert_model", "explore",
    "explore_options", "pareto_front", "plot_explore", "reusable_result", "run_pipeline", "run_summary",
    "saved_model",
]
