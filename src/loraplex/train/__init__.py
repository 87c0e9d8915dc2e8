"""Training: data loading, joint mixed-batch LoRA training, merges and router after training, prediction.

Python equivalents of the CLI: :func:`train` (``loraplex train CONFIG``) and :func:`predict`
(``loraplex predict CONFIG --dataset FILE``). The config itself is :mod:`loraplex.config`; the output folder
:mod:`loraplex.run`. Submodules are imported on first use, so ``import loraplex.train.data`` stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PredictResult", "TrainResult", "Trainer", "predict", "train"]

_LAZY = {
    "TrainResult": "loraplex.train.trainer", "Trainer": "loraplex.train.trainer", "train": "loraplex.train.trainer",
    "PredictResult": "loraplex.train.predict", "predict": "loraplex.train.predict",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'loraplex.train' has no attribute {name!r}")
