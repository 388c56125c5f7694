"""A tiny random ImageReward (BLIP + MLP head) and tokenizer, offline: for tests, notebooks and benchmarks."""

from __future__ import annotations

from typing import Any

import torch

from visalign.rewards.image_reward import ImageRewardModel, blip_reward_configs

__all__ = ["tiny_image_reward"]


def tiny_image_reward(seed: int = 0, image_size: int = 32) -> tuple[ImageRewardModel, Any]:
    """A tiny random :class:`ImageRewardModel` and a word-level BERT-style tokenizer, offline.

    For tests, notebooks and benchmarks: vision 2 layers of width 32 (patch 8), text 2 layers of
    width 32 with cross-attention, the MLP sized for width 32. Built in well under a second.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "a",
        "an",
        "the",
        "photo",
        "of",
        "red",
        "green",
        "blue",
        "cat",
        "dog",
        "cube",
        "sphere",
        "on",
        "in",
        "with",
        "number",
        "painting",
        "picture",
        "big",
        "small",
    ] + [str(i) for i in range(10)]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    torch.manual_seed(seed)
    vcfg, tcfg = blip_reward_configs(
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=8,
            initializer_range=0.02,
        ),
        text=dict(
            vocab_size=len(words) + 2,
            hidden_size=32,
            encoder_hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=40,
            bos_token_id=len(words),
            pad_token_id=0,
            sep_token_id=vocab["[SEP]"],
            eos_token_id=vocab["[SEP]"],
        ),
    )
    model = ImageRewardModel.from_configs(vcfg, tcfg).eval()
    return model, tokenizer
