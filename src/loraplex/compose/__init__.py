"""Composition of adapters on the mixed-batch runtime: blends, stacks, ensembles and routed mixtures (MoE).

Modules (pure math is separate from orchestration):

* :mod:`~loraplex.compose.spec` -- the composition grammar (``a``, ``blend(a=0.7,b=0.3)``, ``stack(a,b)``,
  ``moe(ROUTER_DIR)``, ``merge(...)``, ``ensemble(...)``).
* :mod:`~loraplex.compose.functional`, :mod:`~loraplex.compose.losses` -- pure tensor math.
* :mod:`~loraplex.compose.router` -- routers (linear / mlp / token_gated), save/load.
* :mod:`~loraplex.compose.moe`, :mod:`~loraplex.compose.blend`, :mod:`~loraplex.compose.stack` -- runnable
  compositions; :mod:`~loraplex.compose.train_router` -- router training; :mod:`~loraplex.compose.build` --
  ``build_composition(plex, spec)``.
"""

from loraplex.compose.blend import FixedBlend, LearnedBlend, LogitEnsemble, blend_choice, causal_lm_loss
from loraplex.compose.build import Single, build_composition, register_merge, resolve_router
from loraplex.compose.features import Embedder, get_embedder, routing_pass
from loraplex.compose.functional import Gates, pool_hidden, route
from loraplex.compose.losses import (RouterCollapseWarning, entropy, hard_load_loss, load_shares, router_z_loss,
                                     sq_dev_load_loss, switch_load_balance, warn_collapse)
from loraplex.compose.moe import GatedModel, RoutedModel, Routing, expert_logits
from loraplex.compose.plan import TrainableAdapters, weighted_plan
from loraplex.compose.router import (ROUTER_TYPES, Router, RouterError, TokenGatedRouter, build_router, load_router,
                                     register_router_type, router_from_settings, save_router)
from loraplex.compose.stack import AdditiveStack, InLayerStack, Pipeline, PipelineResult, stack
from loraplex.compose.train_router import (EpochLog, RouterTrainConfig, RouterTrainResult, evaluate_router,
                                           feature_dim, fit_router, lm_loss_matrix, new_router, train_joint, train_lm_loss, train_supervised)

__all__ = [
    "ROUTER_TYPES", "AdditiveStack", "Embedder", "EpochLog", "FixedBlend", "GatedModel", "Gates", "InLayerStack",
    "LearnedBlend", "LogitEnsemble", "Pipeline", "PipelineResult", "RoutedModel", "Router", "RouterCollapseWarning",
    "RouterError", "RouterTrainConfig", "RouterTrainResult", "Routing", "Single", "TokenGatedRouter",
    "TrainableAdapters", "blend_choice", "build_composition", "build_router", "causal_lm_loss", "entropy",
    "evaluate_router", "expert_logits", "feature_dim", "fit_router", "new_router", "get_embedder", "hard_load_loss", "lm_loss_matrix",
    "load_router", "load_shares", "pool_hidden", "register_merge", "register_router_type", "resolve_router", "route",
    "router_from_settings", "router_z_loss", "routing_pass", "save_router", "sq_dev_load_loss", "stack",
    "switch_load_balance", "train_joint", "train_lm_loss", "train_supervised", "warn_collapse", "weighted_plan",
]
