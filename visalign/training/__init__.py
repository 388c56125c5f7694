"""The shared training loop, its options, the online rollout stage, prompt sources and checkpoints."""

from visalign.training.config import ConfigBase, LoopOptions, RolloutConfig, TrainConfig, config_field  # noqa: F401
from visalign.training.online import OnlineTrainer, Rollout  # noqa: F401
from visalign.training.prompts import PromptSampler, PromptSource, load_images  # noqa: F401
from visalign.training.trainer import Trainer, TrainState  # noqa: F401

__all__ = [
    "ConfigBase",
    "LoopOptions",
    "OnlineTrainer",
    "PromptSampler",
    "PromptSource",
    "Rollout",
    "RolloutConfig",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "config_field",
    "load_images",
]
