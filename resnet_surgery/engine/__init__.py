"""Conversion: fx tracing and the residual blocks found from the graph, the rewrites (one handler each), dead computation, transplant, inspect and MACs, what each strided conv reads.

Code outside this package imports from here, not from its modules."""


from .blocks import (
    ADD_FUNCTIONS,
    ADD_METHODS,
    NORM_TYPES,
    Block,
    SurgeryTracer,
    Trunk,
    dilated_note,
    find_blocks,
    find_trunk,
    full_name,
    is_add,
    model_variant,
    modules_on,
    pool_module,
    trace,
)
from .inspect import BlockInfo, DeadSite, Report, StridedConv, count_macs, inspect, module_macs, read_fraction
from .layers import Subsample, avgpool_shortcut, conv1x1_from, conv3x3_from, off_centre_is_zero
from .pooling import (
    ADAPTIVE_POOLS,
    GLOBAL_POOL_FORMS,
    KERNEL_POOLS,
    SPATIAL_REDUCTIONS,
    GlobalPool,
    find_global_pool,
    is_global_reduction,
)
from .probe import max_difference, output_tensors
from .prune import (
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    ELEMENTWISE_MODULES,
    dead_sites,
    prune_dead_compute,
)
from .reads import (
    ConvReads,
    SiteReads,
    axis_counts,
    dead_text,
    grid_text,
    overlap_max,
    read_counts,
    site_reads,
    site_title,
)
from .reads_plot import plot_sites
from .recipe import FORMAT_VERSION, RECIPE_FORMAT, Conversion, Options, Recipe, Rewrite, new_recipe
from .rewrite import HANDLERS, Step, SurgeryNotice, apply_step, convert, plan
from .transplant import (
    CONV_ATTRIBUTES,
    CONVERT_TO,
    CONVERTIBLE_SHORTCUTS,
    OPTIONAL_KEYS,
    Section,
    match,
    sections,
    transplant,
)

__all__ = [
    "ADAPTIVE_POOLS", "ADD_FUNCTIONS", "ADD_METHODS", "Block", "BlockInfo", "CONVERTIBLE_SHORTCUTS", "CONVERT_TO",
    "CONV_ATTRIBUTES", "ConvReads", "Conversion", "DeadSite", "ELEMENTWISE_FUNCTIONS", "ELEMENTWISE_METHODS",
    "ELEMENTWISE_MODULES", "FORMAT_VERSION", "GLOBAL_POOL_FORMS", "GlobalPool", "HANDLERS", "KERNEL_POOLS",
    "NORM_TYPES", "OPTIONAL_KEYS", "Options", "RECIPE_FORMAT", "Recipe", "Report", "Rewrite", "SPATIAL_REDUCTIONS",
    "Section", "SiteReads", "Step", "StridedConv", "Subsample", "SurgeryNotice", "SurgeryTracer", "Trunk",
    "apply_step", "avgpool_shortcut", "axis_counts", "conv1x1_from", "conv3x3_from", "convert", "count_macs",
    "dead_sites", "dead_text", "dilated_note", "find_blocks", "find_global_pool", "find_trunk", "full_name",
    "grid_text", "inspect", "is_add", "is_global_reduction", "match", "max_difference", "model_variant",
    "module_macs", "modules_on", "new_recipe", "off_centre_is_zero", "output_tensors", "overlap_max", "plan",
    "plot_sites", "pool_module", "prune_dead_compute", "read_counts", "read_fraction", "sections", "site_reads",
    "site_title", "trace", "transplant",
]
