"""Instruction editing in the toy world, with an exact check: "make the red circle blue".

An edit task is a triple (source scene, instruction, target scene): the target is the source
with exactly one attribute of one sprite changed. The instruction names the sprite by colour and
shape (unambiguous: the two sprites of a scene have different colours) and says what changes:

=========  ============================================  ==========================================
kind       instruction                                   what changes (everything else stays)
=========  ============================================  ==========================================
color      ``make the red circle blue``                  that sprite's colour
shape      ``turn the red circle into a square``         its shape
position   ``move the red circle to the right``          its position (one-sprite scenes only)
size       ``make the red circle large``                 its size (``small`` / ``large``)
=========  ============================================  ==========================================

:func:`edit_tasks` enumerates the tasks; :func:`apply_instruction` is the exact semantics;
:func:`evaluate_edits` checks edited images: the edited attribute must read as the target's, and
every other attribute as before — read from the *source image* when it is given (so an unstated
size or position must stay what it was), else as the target caption states it.
:class:`ToyEditReward` is the check as a reward: it reads the source scene off the source image
with :func:`~visalign.toy.detect`, applies the instruction and scores the edited image.

Example::

    from visalign.toy import render_batch
    from visalign.toy.edit import edit_tasks, evaluate_edits

    tasks = edit_tasks(kinds=("color",))[:4]
    sources = render_batch([t.source for t in tasks])
    targets = render_batch([t.target for t in tasks])        # a perfect editor
    evaluate_edits(targets, tasks, sources)["all_correct"]   # 1.0
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from visalign.errors import InvalidInputError
from visalign.rewards.base import Reward
from visalign.toy.detection import Detection, detect
from visalign.toy.world import CAPTION_SIZES, COLORS, POSITIONS, SHAPES, Scene, Sprite, all_scenes, as_scene

__all__ = [
    "EDIT_KINDS",
    "EditTask",
    "ToyEditReward",
    "apply_instruction",
    "edit_tasks",
    "evaluate_edits",
    "instruction",
]

EDIT_KINDS: tuple[str, ...] = ("color", "shape", "position", "size")
_POSITION_WORDS = {
    "left": "the left",
    "right": "the right",
    "top": "the top",
    "bottom": "the bottom",
    "center": "the center",
}


@dataclass(frozen=True)
class EditTask:
    """One edit: ``source`` → ``target`` by ``instruction``; ``kind`` is the attribute that changes."""

    source: Scene
    instruction: str
    target: Scene
    kind: str
    index: int  # which sprite of the scene is edited

    @property
    def source_caption(self) -> str:
        return self.source.caption()

    @property
    def target_caption(self) -> str:
        return self.target.caption()


def _name(sprite: Sprite) -> str:
    return f"the {sprite.color} {sprite.shape}"


def instruction(sprite: Sprite, kind: str, value: str) -> str:
    """The instruction that sets ``kind`` of ``sprite`` to ``value``."""
    if kind == "color" or kind == "size":
        return f"make {_name(sprite)} {value}"
    if kind == "shape":
        return f"turn {_name(sprite)} into a {value}"
    if kind == "position":
        return f"move {_name(sprite)} to {_POSITION_WORDS[value]}"
    raise InvalidInputError(f"Unknown edit kind {kind!r}; expected one of {EDIT_KINDS}.")


_INSTRUCTION_RE = re.compile(
    r"(?:make (?P<ref1>{ref}) (?P<value1>{colors}|{sizes})"
    r"|turn (?P<ref2>{ref}) into an? (?P<shape>{shapes})"
    r"|move (?P<ref3>{ref}) to the (?P<position>{positions}))".format(
        ref=r"the (?:{c}) (?:{s})".format(c="|".join(COLORS), s="|".join(SHAPES)),
        colors="|".join(COLORS),
        sizes="|".join(CAPTION_SIZES),
        shapes="|".join(SHAPES),
        positions="|".join(POSITIONS),
    )
)


def apply_instruction(source: Scene | str, text: str) -> tuple[Scene, str, int]:
    """The exact semantics: ``(target scene, kind, index of the edited sprite)``.

    Raises:
        InvalidInputError: the instruction does not parse, names no sprite of the scene, or gives an
            impossible scene (e.g. both sprites the same colour).
    """
    source = as_scene(source)
    clean = " ".join(text.strip().lower().rstrip(".").split())
    m = _INSTRUCTION_RE.fullmatch(clean)
    if m is None:
        raise InvalidInputError(
            f"Cannot parse the edit instruction {text!r}. Instructions are 'make the <colour> <shape> <colour>', "
            f"'make the <colour> <shape> small|large', 'turn the <colour> <shape> into a <shape>' or 'move the "
            f"<colour> <shape> to the left|right|top|bottom|center'."
        )
    ref = m.group("ref1") or m.group("ref2") or m.group("ref3")
    matches = [i for i, s in enumerate(source.sprites) if _name(s) == ref]
    if not matches:
        raise InvalidInputError(f"The instruction {text!r} names {ref!r}, which is not in {source.caption()!r}.")
    index = matches[0]
    sprite = source.sprites[index]
    value = m.group("value1")
    if value in COLORS:
        kind, new = "color", replace(sprite, color=value)
    elif value is not None:
        kind, new = "size", replace(sprite, size=value)
    elif m.group("shape"):
        kind, new = "shape", replace(sprite, shape=m.group("shape"))
    else:
        kind, new = "position", replace(sprite, position=m.group("position"))
    sprites = list(source.sprites)
    sprites[index] = new
    try:
        target = Scene(tuple(sprites), background=source.background)
    except InvalidInputError as exc:
        raise InvalidInputError(f"The instruction {text!r} gives an impossible scene: {exc}") from None
    return target, kind, index


def edit_tasks(
    kinds: Sequence[str] = ("color", "shape", "position"), *, two_shapes: bool = False, sizes: bool = False
) -> list[EditTask]:
    """Every edit task over the toy world's still scenes, in a fixed order.

    Args:
        kinds: which attributes to edit (see :data:`EDIT_KINDS`); ``"size"`` edits sized scenes.
        two_shapes: also edit one sprite of two-sprite scenes (colour, shape and size edits; the
            new colour must differ from the other sprite's).
        sizes: include the scenes with stated sizes as sources.
    """
    unknown = set(kinds) - set(EDIT_KINDS)
    if unknown:
        raise InvalidInputError(f"Unknown edit kinds {sorted(unknown)}; expected a subset of {EDIT_KINDS}.")
    sources = all_scenes(sizes=sizes or "size" in kinds, two_shapes=two_shapes)
    values = {"color": list(COLORS), "shape": list(SHAPES), "position": list(POSITIONS), "size": list(CAPTION_SIZES)}
    tasks = []
    for scene, kind in itertools.product(sources, kinds):
        if kind == "position" and len(scene.sprites) > 1:
            continue
        for index, sprite in enumerate(scene.sprites):
            if kind == "size" and sprite.size is None:
                continue
            for value in values[kind]:
                if getattr(sprite, kind) == value:
                    continue
                text = instruction(sprite, kind, value)
                try:
                    target, _, _ = apply_instruction(scene, text)
                except InvalidInputError:
                    continue  # e.g. recolouring into the other sprite's colour
                tasks.append(EditTask(scene, text, target, kind, index))
    return tasks


def _read(images: torch.Tensor, scenes: Sequence[Scene]) -> list[list[Detection]]:
    out = []
    for n in sorted({len(s.sprites) for s in scenes}):
        rows = [i for i, s in enumerate(scenes) if len(s.sprites) == n]
        for i, dets in zip(rows, detect(images[rows], num_objects=n)):
            out.append((i, dets))
    return [d for _, d in sorted(out, key=lambda x: x[0])]


def _pair(target: Sprite, dets: list[Detection]) -> Detection:
    """The detection of ``target``'s sprite: the one of its colour, else of its shape, else the first."""
    for key in ("color", "shape"):
        for det in dets:
            if det.found and getattr(det, key) == getattr(target, key):
                return det
    return dets[0]


def evaluate_edits(edited: torch.Tensor, tasks: Sequence[EditTask], sources: torch.Tensor | None = None) -> dict:
    """Checks edited images exactly.

    Per sample: ``edited`` (the changed attribute reads as the target's), ``preserved`` (every other
    attribute of every sprite reads as in the source image, or as the target states it without
    ``sources``), ``all_correct`` (both) and ``score`` (the fraction of checked attributes right).

    Returns:
        ``{"edit_accuracy", "preservation", "all_correct", "score", "num_samples", "samples"}``, the
        first four averaged over the samples.
    """
    tasks = list(tasks)
    if edited.shape[0] != len(tasks):
        raise InvalidInputError(f"Got {edited.shape[0]} edited images for {len(tasks)} tasks; pass one task per image.")
    found = _read(edited, [t.target for t in tasks])
    before = _read(sources, [t.source for t in tasks]) if sources is not None else None
    samples = []
    for i, task in enumerate(tasks):
        edit_ok, kept = False, []
        for k, sprite in enumerate(task.target.sprites):
            det = _pair(sprite, found[i])
            ref = _pair(task.source.sprites[k], before[i]) if before is not None else None
            for attr in ("color", "shape", "position", "size"):
                want = getattr(sprite, attr)
                if k == task.index and attr == task.kind:
                    edit_ok = det.found and getattr(det, attr) == want
                    continue
                if ref is not None and ref.found:
                    want = getattr(ref, attr)  # stays what it was in the source image
                elif want is None:
                    continue  # unstated, and no source image to compare with
                kept.append(det.found and getattr(det, attr) == want)
        samples.append(
            {
                "instruction": task.instruction,
                "edited": edit_ok,
                "preserved": all(kept),
                "all_correct": edit_ok and all(kept),
                "score": (edit_ok + sum(kept)) / (1 + len(kept)),
            }
        )
    n = max(len(samples), 1)
    return {
        "edit_accuracy": sum(s["edited"] for s in samples) / n,
        "preservation": sum(s["preserved"] for s in samples) / n,
        "all_correct": sum(s["all_correct"] for s in samples) / n,
        "score": sum(s["score"] for s in samples) / n,
        "num_samples": len(samples),
        "samples": samples,
    }


def _scene_from(dets: list[Detection]) -> Scene | None:
    """The scene a source image shows, read back (None when an object is missing or grey)."""
    sprites = []
    for det in dets:
        if not det.found or det.color is None or det.shape is None:
            return None
        sprites.append(Sprite(det.shape, det.color, det.position, det.size if det.size in CAPTION_SIZES else None))
    try:
        return Scene(tuple(sprites))
    except InvalidInputError:
        return None


class ToyEditReward(Reward):
    """The exact edit check as a reward: the fraction of attributes right (:func:`evaluate_edits`).

    Prompts are instructions; the source images come as ``source_images=`` (or a prompt file's
    ``image`` column). The source scene is read off the source image (with ``num_objects=2``, a
    two-sprite reading is used when it gives a valid scene, else a one-sprite one), so any toy-world
    source works. A source that cannot be read, or an instruction that does not apply to it, scores 0.
    """

    default_name = "toy_edit"
    default_differentiable = False

    def __init__(self, num_objects: int = 1, image_dir: str | None = None, name: str | None = None):
        super().__init__(name=name, differentiable=False)
        self.num_objects = num_objects
        self.image_dir = image_dir  # as EditReward's: where relative ``image`` paths resolve

    def score(self, images: torch.Tensor, prompts: list[str], source_images=None, image=None) -> torch.Tensor:
        from visalign.rewards.edit import EditReward

        sources = EditReward.sources(self, images, source_images, image)
        one = detect(sources.cpu(), num_objects=1)
        two = detect(sources.cpu(), num_objects=2) if self.num_objects == 2 else [None] * len(one)
        scores = torch.zeros(images.shape[0])
        tasks, rows = [], []
        for i, text in enumerate(prompts):
            scene = (two[i] is not None and _scene_from(two[i])) or _scene_from(one[i])
            if scene is None:
                continue
            try:
                target, kind, index = apply_instruction(scene, text)
            except InvalidInputError:
                continue
            tasks.append(EditTask(scene, text, target, kind, index))
            rows.append(i)
        if tasks:
            result = evaluate_edits(images[rows].cpu(), tasks, sources[rows].cpu())
            scores[rows] = torch.tensor([s["score"] for s in result["samples"]])
        return scores.to(images.device)
