"""Multiplexed model ids: the string a request carries to Ray Serve (``serve_multiplexed_model_id``) for the adapter
set it needs, so requests for the same adapters land on the same replicas.

* the bare base model -> ``""`` (no multiplexing: any replica);
* one adapter -> its name;
* a weighted set (a blend, a stack, a router's top-k mix) -> ``blend(a=0.7,b=0.3)`` with exact (``repr``) weights,
  which the replica's registry parses back to the same row choice.
"""

from __future__ import annotations

from typing import Any, Mapping

from loraplex.serve.registry import Resolved, choice_names, parse_spec


def model_id_for(choice: Any) -> str:
    """The multiplexed model id (also the ``model`` the replica is asked for) of a resolved row choice."""
    if choice is None:
        return ""
    if isinstance(choice, str):
        return choice
    items = list(choice.items()) if isinstance(choice, Mapping) else list(choice)
    if not items:
        return ""
    return "blend(" + ",".join(f"{n}={float(w)!r}" for n, w in items) + ")"


def target(resolved: Resolved) -> str:
    """The multiplexed model id for a request the ingress resolved."""
    return model_id_for(resolved.choice)


def adapters_of(model_id: str) -> list[str]:
    """The adapter names a multiplexed model id needs loaded (``[]`` for the base model)."""
    if not model_id:
        return []
    blend = parse_spec(model_id)
    if blend is None:
        return [model_id]
    return choice_names(blend)
