"""The training config: schema (:mod:`.schema`), cross-field checks and defaults (:mod:`.validate`), readable errors
(:mod:`.explain`) and loading from YAML or a dict (:mod:`.load`)."""

from loraplex.config.explain import ConfigError
from loraplex.config.load import load_config, resolve_base_model
from loraplex.config.ludwig import LudwigConfigWarning
from loraplex.config.schema import (ADAPTER_TASKS, AdapterConfig, AdaptersBlock, Feature, MergeConfig, RouterConfig,
                                    RouterTrainSection, TrainConfig, TrainerConfig)

__all__ = ["ADAPTER_TASKS", "AdapterConfig", "AdaptersBlock", "ConfigError", "Feature", "LudwigConfigWarning",
           "MergeConfig", "RouterConfig", "RouterTrainSection", "TrainConfig", "TrainerConfig", "load_config",
           "resolve_base_model"]
