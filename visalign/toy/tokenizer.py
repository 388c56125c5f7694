"""The offline tokenizer of the toy models: a CLIP byte-level BPE whose vocabulary is the world.

The toy world's captions use a few dozen words. :func:`toy_tokenizer` builds a
:class:`transformers.CLIPTokenizer` in memory in which each of those words (plus the prefixes
rewards add, such as CLIPScore's ``"A photo depicts "``) is a single token. Every other string
still tokenizes, byte by byte, so no input ever maps to an unknown token.

Because it is a plain ``CLIPTokenizer`` with a written ``vocab.json`` and ``merges.txt``, the
saved folders load with ``CLIPTokenizer.from_pretrained(folder, local_files_only=True)`` and
inside stock diffusers pipelines, with nothing downloaded.

Example::

    >>> from visalign.toy.tokenizer import toy_tokenizer
    >>> tok = toy_tokenizer(model_max_length=16)
    >>> tok.convert_ids_to_tokens(tok("a red circle on the left").input_ids)
    ['<|startoftext|>', 'a</w>', 'red</w>', 'circle</w>', 'on</w>', 'the</w>', 'left</w>', '<|endoftext|>']
"""

from __future__ import annotations

from visalign.pipelines.tokenizers import word_clip_tokenizer, word_t5_tokenizer
from visalign.toy.world import CAPTION_SIZES, COLORS, MOTIONS, POSITION_PHRASES, SHAPES

__all__ = ["WORDS", "toy_tokenizer", "toy_t5_tokenizer"]


def _world_words() -> tuple[str, ...]:
    words: list[str] = ["a", "an", "and", "moving", *CAPTION_SIZES, *COLORS, *SHAPES, *MOTIONS]
    for phrase in POSITION_PHRASES.values():
        words += phrase.split()
    # Prefixes and words that rewards and users commonly put around a caption ("A photo depicts
    # a red circle", "an image of ...") stay single tokens too, so they cost one position each.
    words += ["photo", "depicts", "of", "image", "picture", "video", "shape", "background"]
    return tuple(dict.fromkeys(words))  # dedupe ("the", "a"), keep the first order


#: The words that are single tokens, in vocabulary order.
WORDS: tuple[str, ...] = _world_words()


def toy_tokenizer(model_max_length: int = 16):
    """Builds the toy world's ``CLIPTokenizer`` offline (about a millisecond).

    The vocabulary is: the 256 byte symbols, the same as word ends (``"x</w>"``), the merged
    pieces that spell every word of :data:`WORDS`, then ``<|startoftext|>`` and ``<|endoftext|>``
    (which, as in SD's CLIP, is also the padding token).

    Args:
        model_max_length (`int`, *optional*, defaults to 16):
            The length stock pipelines pad and truncate to. A caption of the world is at most 9
            tokens with its start and end tokens (a two-shape caption 17), so 16 fits every
            single-shape caption with room for a short prefix; the text encoders need at least
            this many positions.

    Returns:
        `transformers.CLIPTokenizer`: ``len(tokenizer)`` is the vocabulary size.
    """
    return word_clip_tokenizer(WORDS, model_max_length)


def toy_t5_tokenizer(model_max_length: int = 512):
    """A small unigram ``T5Tokenizer`` over the same words, for pipelines that require a T5 slot.

    The toy T2I model's ``text_encoder_3`` outputs zeros whatever it reads (see
    :func:`visalign.toy.models.build_t2i`), so this tokenizer only has to exist, load offline
    and never fail: the pieces are the words of :data:`WORDS` and every printable ASCII
    character, alone and word-initial (``"▁x"``).

    Args:
        model_max_length (`int`, *optional*, defaults to 512): only decides when transformers
            warns about long inputs; pipelines pad to their own ``max_sequence_length``.
    """
    return word_t5_tokenizer(WORDS, model_max_length)
