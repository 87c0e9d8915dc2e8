"""Merging named LoRA adapters into one PEFT-format adapter (delta-level math, exact cat or SVD re-factorisation).

    from loraplex.merge import merge_adapters, merge_to_disk
    merged, report = merge_adapters({"a": ad_a, "b": ad_b}, ["a", "b"], [0.7, 0.3], "ties", density=0.7)
"""

from loraplex.merge.merge import (
    REPORT_NAME, MergeError, MergeReport, ModuleReport, check_method, merge_adapters, merge_from_config,
    merge_to_disk, resolve_weights,
)
from loraplex.merge.methods import (
    MERGE_METHODS, MergeMethod, dare_linear, dare_ties, derive_seed, magnitude_prune, refactorise,
    refactorise_lowrank, task_arithmetic, ties,
)

__all__ = [
    "MERGE_METHODS", "MergeError", "MergeMethod", "MergeReport", "ModuleReport", "REPORT_NAME", "check_method",
    "dare_linear", "dare_ties", "derive_seed", "magnitude_prune", "merge_adapters", "merge_from_config",
    "merge_to_disk", "refactorise", "refactorise_lowrank", "resolve_weights", "task_arithmetic", "ties",
]
