"""loraplex: many LoRA adapters on one base model."""

from loraplex.adapters.bank import AdapterBank
from loraplex.adapters.io import LoraAdapter, LoraModule, load_adapter, load_adapter_dir, save_adapter
from loraplex.adapters.spec import LoraSpec
from loraplex.api import Plex, load
from loraplex.errors import AdapterError, LoraplexError, PathNotAllowedError, UnknownAdapterError

__version__ = "0.1.0"

__all__ = [
    "AdapterBank", "AdapterError", "LoraAdapter", "LoraModule", "LoraSpec", "LoraplexError", "PathNotAllowedError",
    "Plex", "UnknownAdapterError", "load", "load_adapter", "load_adapter_dir", "save_adapter",
]
