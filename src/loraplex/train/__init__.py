"""Training: the YAML config, data loading, joint mixed-batch LoRA training, prediction.

Python equivalents of the CLI: :func:`train` (``loraplex train CONFIG``) and :func:`predict`
(``loraplex predict CONFIG --dataset FILE``). Submodules are imported lazily so ``import loraplex.train.config``
stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ConfigError", "PredictResult", "TrainConfig", "TrainResult", "Trainer", "load_config", "predict", "train"]

_LAZY = {
    "ConfigError": "loraplex.train.config", "TrainConfig": "loraplex.train.config", "load_config": "loraplex.train.config",
    "TrainResult": "loraplex.train.trainer", "Trainer": "loraplex.train.trainer", "train": "loraplex.train.trainer",
    "PredictResult": "loraplex.train.predict", "predict": "loraplex.train.predict",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'loraplex.train' has no attribute {name!r}")
