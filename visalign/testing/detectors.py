"""Tiny random detectors for tests and benchmarks: :func:`tiny_owl` and :func:`tiny_grounding_dino`.

Each builds, offline and in a second, a transformers model of the real architecture with random
weights and a small processor, ready for :class:`~visalign.rewards.detectors.OwlV2Detector` or
:class:`~visalign.rewards.detectors.GroundingDinoDetector`. transformers is imported on the call.
"""

from __future__ import annotations

import torch

__all__ = ["tiny_owl", "tiny_grounding_dino", "TINY_GDINO_WORDS"]


def tiny_owl(v2: bool = True, seed: int = 0):
    """A tiny random OWLv2 (or OWL-ViT v1 with ``v2=False``) at 32 px and its processor, offline.

    1-layer towers, width 32, 8-px patches (16 boxes per image), the tiny word-level CLIP tokenizer
    of :mod:`visalign.testing.rewards`. OWLv2's PIL image processor needs scipy.

    Returns:
        ``(model, processor)``, the model in eval mode.
    """
    from transformers import (
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessorPil,
        Owlv2Processor,
        OwlViTConfig,
        OwlViTForObjectDetection,
        OwlViTImageProcessorPil,
        OwlViTProcessor,
    )

    from visalign.testing.rewards import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer(model_max_length=16)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(seed)
    size = {"height": 32, "width": 32}
    if v2:
        model = Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=32))
        return model.eval(), Owlv2Processor(image_processor=Owlv2ImageProcessorPil(size=size), tokenizer=tok)
    model = OwlViTForObjectDetection(OwlViTConfig(text_config=text, vision_config=vision, projection_dim=32))
    processor = OwlViTProcessor(image_processor=OwlViTImageProcessorPil(size=size, crop_size=size), tokenizer=tok)
    return model.eval(), processor


#: The words of :func:`tiny_grounding_dino`'s word-level tokenizer (any other word is [UNK]).
TINY_GDINO_WORDS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", ".", "cat", "dog", "hot", "car", "person", "circle", "square")


def tiny_grounding_dino(seed: int = 0):
    """A tiny random Grounding DINO (Swin 2 stages of 1 block, 1-layer BERT, 1 encoder and 2 decoder
    layers, 20 queries) with a word-level fast tokenizer and the PIL image processor at 64-96 px.

    Returns:
        ``(model, processor)``, the model in eval mode.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        GroundingDinoProcessor,
        PreTrainedTokenizerFast,
        SwinConfig,
    )

    words = TINY_GDINO_WORDS
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    word_level.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="[PAD]", unk_token="[UNK]",
                                  cls_token="[CLS]", sep_token="[SEP]")  # fmt: skip
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[1, 1], window_size=4, image_size=64,
                                   out_features=["stage1", "stage2"]),
        text_config=BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=20, num_feature_levels=2,
        encoder_n_points=2, decoder_n_points=2, max_text_len=32, use_timm_backbone=False,
        use_pretrained_backbone=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    image_processor = GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96})
    return GroundingDinoForObjectDetection(config).eval(), GroundingDinoProcessor(image_processor, tok)
