"""Prompt sources for training, and a deterministic, resumable sampler over them.

A :class:`PromptSource` is a list of records, each a dict with a ``"prompt"`` string plus any
extra columns (reference images, I2V first frames, metadata) that trainers pass on to the reward
and the policy::

    from visalign.training.prompts import PromptSampler, PromptSource, load_images

    source = PromptSource.from_any("data/prompts.txt")            # one prompt per line, '#' comments
    source = PromptSource.from_any(["a red circle", "a blue square"])
    source = PromptSource.from_any("data/i2v.csv", prompt_column="caption")   # extra columns kept

    sampler = PromptSampler(source, batch_size=4, seed=0, rank=0, world_size=2)
    records = sampler.next_batch()                                  # this rank's 4 records
    frames = load_images(records, "first_frame", base_dir=source.base_dir, size=(256, 256))
    state = sampler.state_dict()                                    # goes into the checkpoint

The sampler walks through epochs, each a permutation drawn from ``numpy.random.default_rng([seed,
epoch])``, so every rank computes the same order without communicating. A step takes the next
``batch_size * world_size`` records of that stream and gives rank ``r`` the ``r``-th slice, so the
ranks of one step draw disjoint records (unless one step needs more records than the source has).
Its state is two integers, which makes a resumed run draw exactly the batches an uninterrupted one
would have.
"""

from __future__ import annotations

import csv
import json
import operator
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visalign.errors import InvalidInputError

__all__ = ["PromptSource", "PromptSampler", "load_images"]

SUFFIXES = (".txt", ".csv", ".jsonl")


class PromptSource(Sequence):
    """An indexable list of prompt records: dicts with a ``"prompt"`` string and extra columns.

    Build one with :meth:`from_any`. Indexing returns a shallow copy, so callers may add keys to a
    record without changing the source.

    Args:
        records: the rows; each must hold ``prompt_column`` with a string value.
        prompt_column: the column holding the prompt; its value is copied to ``"prompt"``.
        base_dir: the folder that relative paths in the extra columns are relative to (the data
            file's folder), or ``None`` for the current directory.
        origin: a name for the data in error messages (a file path, or ``"the prompt list"``).
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        prompt_column: str = "prompt",
        base_dir: str | os.PathLike | None = None,
        origin: str = "the prompt list",
    ):
        self.base_dir = None if base_dir is None else str(base_dir)
        self.origin = origin
        self._records = [_normalise(row, prompt_column, origin, f"item {i}") for i, row in enumerate(records)]
        if not self._records:
            raise InvalidInputError(f"{origin} holds no prompts. Give at least one prompt.")

    @classmethod
    def from_any(cls, obj: Any, prompt_column: str = "prompt") -> PromptSource:
        """Builds a source from a list of prompts, a list of dicts, a PromptSource or a file path.

        Files: ``.txt`` (one prompt per line; blank lines and lines starting with ``#`` skipped),
        ``.csv`` (a header row naming the columns) or ``.jsonl`` (one JSON object per line).

        Args:
            obj: the prompts, as above. A PromptSource is returned unchanged.
            prompt_column: the column (CSV header, JSON or dict key) that holds the prompt.

        Raises:
            InvalidInputError: for an empty source, a missing prompt column, a prompt that is not a
                string, a missing file or an unsupported file suffix.
        """
        if isinstance(obj, PromptSource):
            return obj
        if isinstance(obj, (str, os.PathLike)):
            return cls._from_file(Path(obj), prompt_column)
        if isinstance(obj, Sequence) and not isinstance(obj, (bytes, bytearray)):
            rows = [{"prompt": r} if isinstance(r, str) else r for r in obj]
            # Plain strings are always the prompt, whatever column was named.
            column = "prompt" if obj and all(isinstance(r, str) for r in obj) else prompt_column
            return cls(rows, prompt_column=column)
        raise InvalidInputError(
            f"Prompts must be a list of strings, a list of dicts, a PromptSource or a path to a "
            f"{'/'.join(SUFFIXES)} file; got {type(obj).__name__}."
        )

    @classmethod
    def _from_file(cls, path: Path, prompt_column: str) -> PromptSource:
        suffix = path.suffix.lower()
        if not path.is_file():
            if suffix in SUFFIXES:
                raise InvalidInputError(f"Prompt file '{path}' does not exist.")
            raise InvalidInputError(
                f"'{path}' is not an existing prompt file. A single prompt must be passed as a list, "
                f"e.g. ['{path}']; a prompt file must end in {', '.join(SUFFIXES)}."
            )
        if suffix not in SUFFIXES:
            raise InvalidInputError(
                f"Prompt file '{path}' has the unsupported suffix '{suffix}'. Use one of {', '.join(SUFFIXES)}."
            )
        origin, base_dir = str(path), str(path.resolve().parent)
        with open(path, encoding="utf-8-sig", newline="" if suffix == ".csv" else None) as f:
            if suffix == ".txt":
                rows = [
                    (f"line {i}", {"prompt": line.strip()})
                    for i, line in enumerate(f, 1)
                    if line.strip() and not line.lstrip().startswith("#")
                ]
                prompt_column = "prompt"
            elif suffix == ".csv":
                reader = csv.DictReader(f)
                header = reader.fieldnames or []
                if prompt_column not in header:
                    raise _missing_column(prompt_column, header, origin, "the header")
                # line_num is the reader's line after reading the row, i.e. the row's last line.
                rows = [(f"line {reader.line_num}", row) for row in reader]
            else:
                rows = []
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append((f"line {i}", json.loads(line)))
                    except json.JSONDecodeError as exc:
                        raise InvalidInputError(f"{origin} line {i} is not valid JSON: {exc}.") from None
        # Normalised here so that errors name the file's line rather than the record's index.
        records = [_normalise(row, prompt_column, origin, label) for label, row in rows]
        return cls(records, base_dir=base_dir, origin=origin)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return dict(self._records[index])

    def __repr__(self) -> str:
        return f"PromptSource({len(self)} records from {self.origin}, columns={self.columns})"

    @property
    def prompts(self) -> list[str]:
        """Every record's prompt, in order."""
        return [r["prompt"] for r in self._records]

    @property
    def columns(self) -> list[str]:
        """The column names, ``"prompt"`` first, then others in order of first appearance."""
        seen = {"prompt": None}
        for r in self._records:
            seen.update(dict.fromkeys(r))
        return list(seen)


def _missing_column(column: str, found: Sequence[str], origin: str, where: str) -> InvalidInputError:
    cols = ", ".join(repr(c) for c in found) or "none"
    return InvalidInputError(
        f"{origin}: {where} has no prompt column '{column}'; columns found: {cols}. "
        f"Pick the column that holds the prompts with prompt_column=<name>."
    )


def _normalise(row: Any, prompt_column: str, origin: str, label: str) -> dict[str, Any]:
    if not isinstance(row, Mapping):
        raise InvalidInputError(
            f"{origin} {label} is of type {type(row).__name__}; each record must be a prompt string or a dict "
            f"with a '{prompt_column}' key."
        )
    if None in row:  # csv.DictReader files surplus cells under the key None
        raise InvalidInputError(f"{origin} {label} has more cells than the header has columns.")
    if prompt_column not in row:
        raise _missing_column(prompt_column, list(row), origin, label)
    prompt = row[prompt_column]
    if not isinstance(prompt, str):
        raise InvalidInputError(
            f"{origin} {label}: the prompt in column '{prompt_column}' must be a string, got "
            f"{type(prompt).__name__} {prompt!r}."
        )
    if prompt_column != "prompt" and "prompt" in row:
        # Copying the chosen column to "prompt" would silently discard this one.
        raise InvalidInputError(
            f"{origin} {label} has both a 'prompt' column and the chosen prompt_column "
            f"'{prompt_column}'; rename one of them."
        )
    return {**row, "prompt": prompt}


def load_images(
    records: Sequence[Mapping[str, Any]],
    column: str,
    base_dir: str | os.PathLike | None = None,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Loads the images named in one column of a batch of records.

    Args:
        records: the records, e.g. from :meth:`PromptSampler.next_batch`.
        column: the column holding image paths (or PIL images).
        base_dir: the folder relative paths are resolved against, usually ``source.base_dir``;
            ``None`` resolves them against the current directory.
        size: ``(height, width)`` to resize every image to (PIL bicubic); ``None`` keeps the
            files' size, which must then be the same for all.

    Returns:
        A float tensor in [0, 1] of shape ``(B, 3, H, W)``; grayscale and RGBA files become RGB.
    """
    from PIL import Image, UnidentifiedImageError

    if len(records) == 0:
        raise InvalidInputError("load_images got no records; pass at least one.")
    if size is not None:
        try:  # operator.index accepts numpy ints too, but not floats
            hw = tuple(operator.index(s) for s in size)
        except TypeError:
            hw = ()
        if len(hw) != 2 or min(hw) < 1:
            raise InvalidInputError(f"size must be (height, width) with positive ints, got {size!r}.")
        size = hw
    out = []
    for i, record in enumerate(records):
        where = f"row {i} (prompt {record.get('prompt', '')!r})"
        if column not in record:
            cols = ", ".join(repr(c) for c in record)
            raise InvalidInputError(f"{where} has no image column '{column}'; columns found: {cols}.")
        value = record[column]
        if isinstance(value, Image.Image):
            image = value.convert("RGB")
        elif isinstance(value, (str, os.PathLike)):
            path = Path(value)
            if not path.is_absolute() and base_dir is not None:
                path = Path(base_dir) / path
            if not path.is_file():
                raise InvalidInputError(
                    f"{where}: image file '{value}' in column '{column}' does not exist (looked at '{path}'). "
                    "Relative paths are resolved against the prompt file's folder."
                )
            try:
                with Image.open(path) as f:
                    image = f.convert("RGB")
            except (UnidentifiedImageError, OSError) as exc:
                raise InvalidInputError(f"{where}: '{path}' could not be read as an image ({exc}).") from None
        else:
            raise InvalidInputError(
                f"{where}: column '{column}' must hold an image path or a PIL image, got {type(value).__name__}."
            )
        if size is not None and image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), Image.Resampling.BICUBIC)  # PIL sizes are (w, h)
        out.append(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1))
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:
        raise InvalidInputError(
            f"The images in column '{column}' have different sizes {sorted(s[1:] for s in shapes)}; "
            "pass size=(height, width) to resize them."
        )
    return torch.stack(out).float() / 255


class PromptSampler:
    """Deterministic, resumable batches of prompt records for one rank of a (distributed) run.

    Args:
        source: a :class:`PromptSource` (or anything :meth:`PromptSource.from_any` accepts).
        batch_size: records per call of :meth:`next_batch` on this rank.
        seed: the seed of the epoch permutations; the same on every rank.
        rank: this process's rank, in ``[0, world_size)``.
        world_size: the number of processes drawing from the source together.
        shuffle: permute each epoch; ``False`` walks the source in order.
        drop_last: start a new epoch rather than let a step straddle two; a step then never sees a
            record twice, and the epoch's last ``len(source) % (batch_size * world_size)`` records
            are skipped.
    """

    def __init__(
        self,
        source: Any,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = False,
    ):
        self.source = PromptSource.from_any(source)
        for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1), ("seed", seed, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InvalidInputError(f"PromptSampler {name} must be an int >= {low}, got {value!r}.")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise InvalidInputError(f"PromptSampler rank must be in [0, {world_size}), got {rank!r}.")
        if drop_last and batch_size * world_size > len(self.source):
            raise InvalidInputError(
                f"drop_last=True needs batch_size * world_size = {batch_size * world_size} <= the "
                f"{len(self.source)} prompts; lower the batch size or set drop_last=False."
            )
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch = 0  # the epoch the next record comes from
        self.offset = 0  # the position of the next record in that epoch's order
        self._order: tuple[int, np.ndarray] | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            n = len(self.source)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order = (epoch, order)
        return self._order[1]

    def next_batch(self) -> list[dict[str, Any]]:
        """This rank's next ``batch_size`` records (copies); wraps into the next epoch when needed."""
        n, need = len(self.source), self.batch_size * self.world_size
        if self.drop_last and n - self.offset < need:
            self.epoch, self.offset = self.epoch + 1, 0
        step: list[int] = []
        while len(step) < need:  # every rank computes the whole step so that they agree on it
            take = min(need - len(step), n - self.offset)
            step.extend(self._epoch_order(self.epoch)[self.offset : self.offset + take].tolist())
            self.offset += take
            if self.offset == n:
                self.epoch, self.offset = self.epoch + 1, 0
        mine = step[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return [self.source[i] for i in mine]

    def state_dict(self) -> dict[str, int | bool]:
        """The position in the record stream (the same on every rank), for checkpoints."""
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_records": len(self.source),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continues from a :meth:`state_dict`; the source, seed and shuffle must match the saved run.

        The world size may differ: the position counts records of the shared stream, not batches.
        """
        for key, mine in (("num_records", len(self.source)), ("seed", self.seed), ("shuffle", self.shuffle)):
            if key in state and state[key] != mine:
                raise InvalidInputError(
                    f"The sampler state was saved with {key}={state[key]!r}, but this sampler has "
                    f"{key}={mine!r}; resume with the same prompts and seed, or start a fresh run."
                )
        if not 0 <= int(state["offset"]) < len(self.source) or int(state["epoch"]) < 0:
            raise InvalidInputError(f"Invalid sampler state {dict(state)!r}.")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
