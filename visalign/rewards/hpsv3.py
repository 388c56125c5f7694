"""HPSv3: Human Preference Score v3 (Ma et al. 2025, arXiv 2508.03789; MIT).

A fully fine-tuned Qwen2-VL-7B-Instruct with one added token ``<|Reward|>``. The prompt is HPSv3's
instruction with the caption, followed by ``"\\nPlease provide the overall ratings of this image:
<|Reward|>\\n\\nEND\\n"``, in the chat template with the generation prompt (right padding); the image
is resized to exactly 200704 pixels (256 merged 28x28 patches; min = max). The hidden state at
``<|Reward|>`` goes through ``Linear(h, 1024) ReLU Dropout Linear(1024, 16) ReLU Linear(16, 2)``
in float32, giving a Gaussian (mu, sigma) of the preference; the score is mu.

The released ``HPSv3.safetensors`` is a full state dict in the transformers < 4.52 layout
(``model.*``, ``visual.*``, ``lm_head.weight``, ``rm_head.*``); it is remapped and loaded strictly
(:meth:`~visalign.rewards.qwen_reward_head.QwenRewardHeadModel.load_checkpoint`).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from visalign.errors import ConfigError
from visalign.rewards.base import Reward, freeze
from visalign.rewards.loading import load_state_dict
from visalign.rewards.qwen_inputs import QwenInputBuilder, add_reward_tokens, load_tokenizer
from visalign.rewards.qwen_reward_head import QwenRewardHeadModel, empty_backbone

__all__ = ["HPSv3", "HPSV3_REPO", "HPSV3_FILE", "HPSV3_BASE", "HPSV3_INSTRUCTION", "HPSV3_SUFFIX", "hpsv3_head"]

HPSV3_REPO = "MizzenAI/HPSv3"
HPSV3_FILE = "HPSv3.safetensors"
HPSV3_BASE = "Qwen/Qwen2-VL-7B-Instruct"
HPSV3_TOKEN = "<|Reward|>"
HPSV3_PIXELS = 256 * 28 * 28

# The instruction HPSv3 was trained with (MizzenAI/HPSv3, hpsv3/dataset/data_collator_qwen.py,
# MIT). The wording and whitespace are part of the model's input: keep them byte-exact.
HPSV3_INSTRUCTION = (
    "\nYou are tasked with evaluating a generated image based on Visual Quality and Text Alignment "
    "and give a overall score to estimate the human preference. Please provide a rating from 0 to "
    "10, with 0 being the worst and 10 being the best. \n\n**Visual Quality:**  \nEvaluate the "
    "overall visual quality of the image. The following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or logical "
    "errors, such as abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear "
    "and easy to interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and "
    "other visual elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color "
    "scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene "
    "should convey a sense of harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such as "
    "political, violent, or adult material. If such content is present, the image quality and "
    "satisfaction score should be the lowest possible. \n\n**Text Alignment:**  \nAssess how well "
    "the image matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, "
    "animal, object) align with the textual description. The subject should match the description "
    "in terms of number, appearance, and behavior.\n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, "
    "evaluate how well the image adheres to this style.\n"
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding "
    "elements in the image logically fit the scenario described in the prompt. The environment "
    "should support and enhance the subject without contradictions.\n"
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, "
    "clothing, accessories, expressions, actions) are faithfully represented in the image. Minor "
    "deviations may be acceptable, but critical attributes should be preserved.\n"
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are "
    "captured in the image. The generated content should not introduce elements that conflict "
    "with or distort the original description.\nTextual prompt - {text_prompt}\n\n\n"
)
HPSV3_SUFFIX = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"


def hpsv3_head(hidden_size: int, dropout: float = 0.05) -> nn.Sequential:
    """HPSv3's head: ``Linear(h, 1024) ReLU Dropout Linear(1024, 16) ReLU Linear(16, 2)`` (keys
    ``rm_head.{0,3,5}.*`` in the checkpoint), outputs (mu, sigma).
    """
    return nn.Sequential(
        nn.Linear(hidden_size, 1024), nn.ReLU(), nn.Dropout(dropout), nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, 2)
    )


class HPSv3(Reward):
    r"""HPSv3 preference score: mu of the Gaussian the Qwen2-VL head predicts at ``<|Reward|>``.

    Args:
        checkpoint: the released weights: a local ``HPSv3.safetensors`` (or ``.pt``, read with
            ``torch.load(weights_only=True)``), a state dict (old or new key layout), a URL, or a
            hub repo id (then ``filename`` is taken from it). Defaults to :data:`HPSV3_REPO` when
            ``model`` is ``None``, and to no loading otherwise.
        model: a :class:`~visalign.rewards.qwen_reward_head.QwenRewardHeadModel` already built,
            or a Qwen2-VL (``Qwen2VLModel`` / ``Qwen2VLForConditionalGeneration``) to which a
            fresh :func:`hpsv3_head` is attached. When ``None``, the architecture of ``base``'s
            config is built without random initialisation and ``checkpoint`` loaded into it.
        tokenizer: the Qwen2-VL tokenizer (hub id, folder or object; default ``base``);
            ``<|Reward|>`` is added when missing.
        base: the hub id of the base model, for its config and tokenizer.
        filename: the file inside a hub repo or folder.
        instruction: the instruction (``{text_prompt}`` is the caption) and ``suffix`` (holds the
            reward token); default HPSv3's.
        pixels: the image's pixel count (min = max; default 200704).
        chat_template: overrides the tokenizer's chat template.
        batch_size, torch_dtype, name, differentiable: as for every :class:`Reward` (defaults 4,
            the checkpoint's, ``"hpsv3"``, True).

    Example::

        reward = HPSv3(torch_dtype=torch.bfloat16)   # downloads MizzenAI/HPSv3 + the 7B config
        reward(images, prompts)                      # mu, about 0-15 for good generations
    """

    default_name = "hpsv3"

    def __init__(
        self,
        checkpoint: Any = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        base: str = HPSV3_BASE,
        filename: str = HPSV3_FILE,
        instruction: str = HPSV3_INSTRUCTION,
        suffix: str = HPSV3_SUFFIX,
        pixels: int = HPSV3_PIXELS,
        chat_template: str | None = None,
        batch_size: int | None = 4,
        torch_dtype: torch.dtype | None = None,
        name: str | None = None,
        differentiable: bool = True,
    ):
        super().__init__(name=name, differentiable=differentiable, batch_size=batch_size)
        if HPSV3_TOKEN not in suffix and HPSV3_TOKEN not in instruction:
            raise ConfigError(f"the HPSv3 prompt must hold the reward token {HPSV3_TOKEN}.")
        self.tokenizer = load_tokenizer(tokenizer if tokenizer is not None else base)
        token_ids = add_reward_tokens(self.tokenizer, [HPSV3_TOKEN])
        if model is None and checkpoint is None:
            checkpoint = HPSV3_REPO
        sd = None
        if checkpoint is not None:
            sd = load_state_dict(checkpoint, filename if isinstance(checkpoint, (str, os.PathLike)) else None)
        if model is None:
            from transformers import AutoConfig

            from visalign.rewards.loading import from_pretrained

            config = from_pretrained(AutoConfig, base, what="Qwen2-VL config")
            embed = next((v for k, v in sd.items() if k.endswith("embed_tokens.weight")), None)
            backbone = empty_backbone(config, None if embed is None else int(embed.shape[0]))
            model = QwenRewardHeadModel(backbone, hpsv3_head(config.text_config.hidden_size), token_ids)
        elif not isinstance(model, QwenRewardHeadModel):
            hidden = int(_text_config(model).hidden_size)
            model = QwenRewardHeadModel(model, hpsv3_head(hidden), token_ids)
        if model.reward_token_ids != token_ids:
            raise ConfigError(
                f"the model reads tokens {model.reward_token_ids} but the tokenizer maps {HPSV3_TOKEN} to {token_ids}."
            )
        if sd is not None:
            model.load_checkpoint(sd)
        vocab = int(model.backbone.get_input_embeddings().weight.shape[0])
        if len(self.tokenizer) > vocab:
            raise ConfigError(f"the tokenizer has {len(self.tokenizer)} tokens but the model's embedding only {vocab}.")
        if torch_dtype is not None:
            model.backbone.to(torch_dtype)
        self.model = freeze(model)
        self.instruction, self.suffix = instruction, suffix
        self.inputs = QwenInputBuilder(
            self.tokenizer, model.config, chat_template=chat_template, min_pixels=pixels, max_pixels=pixels
        )

    def prompt_text(self, prompt: str) -> str:
        """The user turn's text for ``prompt`` (before the chat template)."""
        return self.instruction.replace("{text_prompt}", prompt) + self.suffix

    def predict(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma), each (B,) float32, for [0, 1] images (B, 3, H, W)."""
        inputs = self.inputs.build([im[None] for im in images], [self.prompt_text(p) for p in prompts], "image")
        out = self.model(**inputs)[:, 0]
        return out[:, 0], out[:, 1]

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.predict(images, prompts)[0]


def _text_config(model: Any) -> Any:
    cfg = model.config
    return getattr(cfg, "text_config", cfg)
