"""Offline tokenizers for the tiny test pipelines.

Real checkpoints ship their tokenizers as hub files, which tests must never download. The
tokenizers here are built in memory from a small written vocabulary instead:

- :func:`tiny_clip_tokenizer` is a byte-level BPE :class:`~transformers.CLIPTokenizer` (the SD,
  SDXL, SD3 and Flux CLIP towers).
- :func:`tiny_t5_tokenizer` is a unigram :class:`~transformers.T5Tokenizer` (the T5 tower of SD3 and
  Flux, and the UMT5 tower of Wan).

Both cover every input (no ``<unk>`` for lowercase ASCII prompts), keep common prompt words as one
token so short prompts stay short, build in about a millisecond, and survive ``save_pretrained``
followed by ``from_pretrained``. Both are made by the runtime builders of
:mod:`visalign.pipelines.tokenizers` (:func:`word_clip_tokenizer`, re-exported here, and
:func:`~visalign.pipelines.tokenizers.word_t5_tokenizer`) over a fixed list of common prompt words.

Example::

    >>> from visalign.testing.tokenizers import tiny_clip_tokenizer
    >>> tok = tiny_clip_tokenizer()
    >>> tok.convert_ids_to_tokens(tok("a red circle").input_ids)
    ['<|startoftext|>', 'a</w>', 'red</w>', 'circle</w>', '<|endoftext|>']
"""

from __future__ import annotations

from visalign.pipelines.tokenizers import word_clip_tokenizer, word_t5_tokenizer

__all__ = ["CLIP_MAX_LENGTH", "T5_MAX_LENGTH", "tiny_clip_tokenizer", "tiny_t5_tokenizer", "word_clip_tokenizer"]

#: Padded length of the tiny CLIP tokenizers. Real CLIP uses 77; 32 keeps the text short while
#: leaving room for the usual test prompts (the common words below are single tokens; other words
#: cost a token per letter or two).
CLIP_MAX_LENGTH = 32

#: ``model_max_length`` of the tiny T5 tokenizer, as the real SD3, Flux and Wan T5 tokenizers ship.
#: The pipelines pad T5 text to their own ``max_sequence_length`` argument, not to this value; it
#: only decides when transformers warns about a long input.
T5_MAX_LENGTH = 512

# Words that tokenize to a single token in both tokenizers, so that typical test prompts
# ("a photo of a red cat", a Wan negative prompt) stay a few tokens long.
# The toy world's captions ("a red circle on the left") are all made of these words.
_WORDS = (
    "a",
    "an",
    "the",
    "of",
    "and",
    "in",
    "on",
    "at",
    "with",
    "by",
    "over",
    "photo",
    "picture",
    "painting",
    "cat",
    "dog",
    "bird",
    "horse",
    "car",
    "house",
    "tree",
    "man",
    "woman",
    "astronaut",
    "riding",
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "black",
    "white",
    "circle",
    "square",
    "triangle",
    "shape",
    "left",
    "right",
    "top",
    "bottom",
    "center",
    "background",
    "sky",
    "ocean",
    "city",
    "night",
    "sunset",
    "mountain",
    "river",
    "beautiful",
    "high",
    "quality",
    "low",
    "blurry",
    "ugly",
    "portrait",
    "landscape",
    "video",
    "walking",
    "running",
)


def tiny_clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH):
    """Builds the tiny pipelines' CLIP tokenizer offline: :func:`word_clip_tokenizer` over common prompt words.

    Args:
        model_max_length (`int`, *optional*, defaults to `CLIP_MAX_LENGTH`):
            The length the pipelines pad and truncate CLIP text to. The tiny CLIP text encoders have
            77 positions, so any value up to 77 works with them.

    Returns:
        `transformers.CLIPTokenizer`: the tokenizer. ``len(tokenizer)`` is its vocabulary size.
    """
    return word_clip_tokenizer(_WORDS, model_max_length)


def tiny_t5_tokenizer(model_max_length: int = T5_MAX_LENGTH):
    """Builds a tiny unigram T5 tokenizer offline (used for T5 and UMT5 text encoders).

    Ids 0, 1 and 2 are ``<pad>``, ``</s>`` and ``<unk>`` as in T5. The pieces are the common prompt
    words (word-initial, ``"▁word"``) and every printable ASCII character alone and word-initial,
    so ASCII text never maps to ``<unk>``. There are no ``<extra_id_*>`` sentinels: only the
    encoder is used.

    Args:
        model_max_length (`int`, *optional*, defaults to `T5_MAX_LENGTH`):
            Only decides when transformers warns that an input is long; the pipelines pad to their
            own ``max_sequence_length``.

    Returns:
        `transformers.T5Tokenizer`: the tokenizer. ``len(tokenizer)`` is its vocabulary size.
    """
    return word_t5_tokenizer(_WORDS, model_max_length)
