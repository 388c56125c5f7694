"""Offline tokenizer builders: a CLIP or T5 tokenizer built in memory from a list of words.

Real checkpoints ship their tokenizers as hub files. The builders here make stock tokenizers from
a small written vocabulary instead, with nothing downloaded, in about a millisecond:

- :func:`word_clip_tokenizer`: a byte-level BPE :class:`~transformers.CLIPTokenizer` in which each
  given word is one token;
- :func:`word_t5_tokenizer`: a unigram :class:`~transformers.T5Tokenizer` over the same kind of
  word list.

Both cover every input (no ``<unk>`` for ASCII text) and survive ``save_pretrained`` followed by
``from_pretrained``. The toy models' tokenizers (:mod:`visalign.toy.tokenizer`) and the tiny test
pipelines' are built with them. They use the tokenizer constructors of transformers 5, which take
the vocabulary directly.

Example::

    >>> from visalign.pipelines.tokenizers import word_clip_tokenizer
    >>> tok = word_clip_tokenizer(["a", "red", "circle"])
    >>> tok.convert_ids_to_tokens(tok("a red circle").input_ids)
    ['<|startoftext|>', 'a</w>', 'red</w>', 'circle</w>', '<|endoftext|>']
"""

from __future__ import annotations

import string

from visalign.errors import MissingDependencyError

__all__ = ["word_clip_tokenizer", "word_t5_tokenizer"]


def _require_transformers_5():
    import transformers

    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        # The tokenizer constructors used below take the vocabulary in memory only since 5.0.
        raise MissingDependencyError(
            f"visalign builds its offline tokenizers with the transformers 5 API, but "
            f"transformers {transformers.__version__} is installed. Upgrade it with "
            f'`pip install -U "transformers>=5"`.'
        )
    return transformers


def _byte_symbols() -> list[str]:
    """The 256 printable characters that byte-level BPE uses for the 256 byte values.

    Bytes that are printable stay themselves; the others are moved to code points from 256 on, so
    every byte has a visible, non-whitespace symbol (the GPT-2 / CLIP convention).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _apply_merges(symbols: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Splits a word as BPE does: repeatedly join the adjacent pair whose merge ranks first."""
    rank = {pair: i for i, pair in enumerate(merges)}
    while len(symbols) > 1:
        pairs = zip(symbols, symbols[1:])
        ranked = [(rank[pair], i) for i, pair in enumerate(pairs) if pair in rank]
        if not ranked:
            break
        _, i = min(ranked)
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def word_clip_tokenizer(words, model_max_length: int = 32):
    """Builds a byte-level BPE :class:`~transformers.CLIPTokenizer` in which each of ``words`` is one token.

    The vocabulary holds every byte symbol, alone and as a word end (``"x</w>"``), plus merges that
    spell each word as one token, plus ``<|startoftext|>`` and ``<|endoftext|>`` (also the padding
    token, as in SD 1.x). Any text encodes without unknown tokens. This is the one builder behind
    the tiny test pipelines' CLIP tokenizer, the tiny reward CLIPs and the toy world's tokenizer.

    Args:
        words: the words that become single tokens, in vocabulary order.
        model_max_length:
            The length pipelines pad and truncate CLIP text to.

    Returns:
        `transformers.CLIPTokenizer`: the tokenizer. ``len(tokenizer)`` is its vocabulary size.
    """
    transformers = _require_transformers_5()
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for token in [*symbols, *(s + "</w>" for s in symbols)]:
        vocab[token] = len(vocab)
    # BPE only produces a token through a merge whose result is in the vocabulary. Each word is
    # first split by the merges so far ("cat" -> "c", "at</w>" once "at" is in), then its pieces are
    # joined left to right by new merges. New merges rank after the old ones, so the words added
    # before stay single tokens.
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = _apply_merges([*word[:-1], word[-1] + "</w>"], merges)
        left = pieces[0]
        for right in pieces[1:]:
            merges.append((left, right))
            vocab.setdefault(left + right, len(vocab))
            left = left + right
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def word_t5_tokenizer(words, model_max_length: int = 512):
    """Builds a unigram :class:`~transformers.T5Tokenizer` in which each of ``words`` is one piece.

    Ids 0, 1 and 2 are ``<pad>``, ``</s>`` and ``<unk>`` as in T5. The pieces are the words
    (word-initial, ``"▁word"``) and every printable ASCII character alone and word-initial, so
    ASCII text never maps to ``<unk>``. There are no ``<extra_id_*>`` sentinels: only the encoder
    is used. This is the one builder behind the tiny test pipelines' T5 tokenizer and the toy
    models' T5 tokenizer.

    Args:
        words: the words that become single pieces.
        model_max_length:
            Only decides when transformers warns that an input is long; the pipelines pad to their
            own ``max_sequence_length``.

    Returns:
        `transformers.T5Tokenizer`: the tokenizer. ``len(tokenizer)`` is its vocabulary size.
    """
    transformers = _require_transformers_5()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    # Unigram picks the segmentation with the highest total score: whole words beat characters.
    pieces += [("▁" + word, -3.0) for word in words]
    for char in string.ascii_letters + string.digits + string.punctuation:
        pieces += [(char, -6.0), ("▁" + char, -5.0)]
    # Drop the duplicates ("▁a" is both a word and a word-initial letter); the first one wins.
    seen: set[str] = set()
    pieces = [p for p in pieces if not (p[0] in seen or seen.add(p[0]))]
    return transformers.T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)
