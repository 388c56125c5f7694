"""The shared training loop, its config system, prompt sources and checkpoints."""

from visalign.training.config import ConfigBase, TrainConfig, config_field  # noqa: F401
from visalign.training.prompts import PromptSampler, PromptSource, load_images  # noqa: F401
from visalign.training.trainer import Trainer, TrainState  # noqa: F401

__all__ = ["ConfigBase", "TrainConfig", "config_field", "PromptSampler", "PromptSource", "load_images",
           "Trainer", "TrainState"]
