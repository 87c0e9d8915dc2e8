"""Composition of adapters on the mixed-batch runtime: blends, stacks, ensembles and routed mixtures (MoE).

Modules (pure math is separate from orchestration):

* :mod:`~loraplex.compose.spec` -- the composition grammar (``a``, ``blend(a=0.7,b=0.3)``, ``stack(a,b)``,
  ``moe(ROUTER_DIR)``, ``merge(...)``, ``ensemble(...)``).
* :mod:`~loraplex.compose.functional`, :mod:`~loraplex.compose.losses` -- pure tensor math.
* :mod:`~loraplex.compose.router` -- routers (linear / mlp / token_gated), save/load.
* :mod:`~loraplex.compose.moe`, :mod:`~loraplex.compose.blend`, :mod:`~loraplex.compose.stack` -- runnable
  compositions; :mod:`~loraplex.compose.train_router` -- router training; :mod:`~loraplex.compose.build` --
  ``build_composition(plex, spec)``; :mod:`~loraplex.compose.trainable` -- weighted plans, trainable adapter
  factors and per-thread layer hooks (the plumbing between compositions and the mixed-batch plan).

The names below are imported on first use, so importing one submodule (the grammar, say) does not import the rest.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("FixedBlend", "LearnedBlend", "LogitEnsemble", "blend_choice", "causal_lm_loss"), "blend"),
    **dict.fromkeys(("Single", "build_composition", "register_merge", "resolve_router"), "build"),
    **dict.fromkeys(("Embedder", "get_embedder", "routing_pass"), "features"),
    **dict.fromkeys(("Gates", "pool_hidden", "route"), "functional"),
    **dict.fromkeys(("RouterCollapseWarning", "entropy", "hard_load_loss", "load_shares", "router_z_loss",
                     "sq_dev_load_loss", "switch_load_balance", "warn_collapse"), "losses"),
    **dict.fromkeys(("GatedModel", "RoutedModel", "Routing", "expert_logits"), "moe"),
    **dict.fromkeys(("TrainableAdapters", "weighted_plan"), "trainable"),
    **dict.fromkeys(("ROUTER_TYPES", "Router", "RouterError", "TokenGatedRouter", "build_router", "load_router",
                     "register_router_type", "router_from_settings", "save_router"), "router"),
    **dict.fromkeys(("AdditiveStack", "InLayerStack", "Pipeline", "PipelineResult"), "stack"),
    **dict.fromkeys(("EpochLog", "RouterTrainConfig", "RouterTrainResult", "evaluate_router", "feature_dim",
                     "fit_router", "lm_loss_matrix", "new_router", "train_joint", "train_lm_loss",
                     "train_supervised"), "train_router"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loraplex.compose' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"loraplex.compose.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
