"""GenEval's prompts: the vocabulary, the structured spec of a prompt, and the parser that builds it.

GenEval (Ghosh et al., arXiv 2310.11513) scores an image against a structured prompt. This module
holds the prompt side, pure text:

- the vocabulary: :data:`GENEVAL_CLASSES` (80 object names), :data:`GENEVAL_COLORS` (ten colours),
  :data:`RELATIONS` (the four positions) and :data:`TAGS`;
- :class:`GenEvalSpec` (a tag and its ``include`` / ``exclude`` :class:`Clause` s), read from a line of
  GenEval's metadata file with :meth:`GenEvalSpec.from_metadata` (``{"tag", "include": [{"class",
  "count", "color"?, "position"?}], "exclude"?}``), which is what a training run over GenEval's
  prompt file uses;
- :func:`parse_prompt`, which turns a GenEval-style prompt ("a photo of three dogs", "a photo of a
  red car", "a photo of a dog left of a cat", "a photo of a cat and a dog") into the same spec;
  :data:`ACCEPTED_FORMS` is the help its errors show.

The checks of detections against a spec are in :mod:`visalign.rewards.geneval_rules`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from visalign.errors import InvalidInputError

__all__ = [
    "GENEVAL_COLORS",
    "GENEVAL_CLASSES",
    "RELATIONS",
    "TAGS",
    "ACCEPTED_FORMS",
    "Clause",
    "GenEvalSpec",
    "parse_prompt",
]

# ----------------------------------------------------------------------------- vocabulary
#: The ten colours GenEval classifies crops into (and the colour words the parser knows).
GENEVAL_COLORS: tuple[str, ...] = (
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
)
#: GenEval's 80 object names (the COCO classes, with a few renamed to be unambiguous).
GENEVAL_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
#: Position relations, as GenEval writes them ("A left of B": A is left of B).
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
#: GenEval's tags. Only ``counting`` changes a rule (the 0.9 confidence threshold).
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

NUMBER_WORDS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10,
}  # fmt: skip
_PREFIXES = ("a photo of ", "a picture of ", "an image of ", "a photograph of ")
_PLURAL_EXCEPTIONS = {
    "people": "person", "persons": "person", "mice": "mouse", "knives": "knife", "buses": "bus",
    "sheep": "sheep", "skis": "skis", "scissors": "scissors", "teeth": "tooth", "feet": "foot",
    "men": "man", "women": "woman", "children": "child", "geese": "goose", "leaves": "leaf",
    "wolves": "wolf", "shelves": "shelf", "fish": "fish", "deer": "deer", "glasses": "glass",
    "tvs": "tv",
}  # fmt: skip

ACCEPTED_FORMS = (
    "GenEval prompts take these forms (case and a final full stop are ignored; the prefix "
    "'a photo of' is optional):\n"
    "  object presence: 'a photo of a cat', 'a photo of an apple'\n"
    "  counting:        'a photo of three dogs' (one ... ten, or digits)\n"
    "  colour:          'a photo of a red car' (colours: " + ", ".join(GENEVAL_COLORS) + ")\n"
    "  position:        'a photo of a dog left of a cat' (left of | right of | above | below)\n"
    "  two objects:     'a photo of a cat and a dog', 'a photo of a red car and a blue dog'\n"
    "or give the sample's GenEval metadata instead of parsing, e.g. "
    "metadata={'tag': 'counting', 'include': [{'class': 'dog', 'count': 3}], "
    "'exclude': [{'class': 'dog', 'count': 4}]}."
)


# ----------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class Clause:
    """One ``include`` or ``exclude`` clause of a GenEval spec.

    Attributes:
        cls: the object class, e.g. ``"dog"``.
        count: include: at least this many; exclude: fewer than this many.
        color: the colour every counted object must have (include only).
        position: ``(relation, index)``: every counted object must be ``relation`` (one of
            :data:`RELATIONS`) every object of the earlier include clause ``index``.
    """

    cls: str
    count: int = 1
    color: str | None = None
    position: tuple[str, int] | None = None

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"class": self.cls, "count": self.count}
        if self.color is not None:
            out["color"] = self.color
        if self.position is not None:
            out["position"] = [self.position[0], self.position[1]]
        return out


@dataclass(frozen=True)
class GenEvalSpec:
    """What an image must show: GenEval's metadata for one prompt.

    Attributes:
        tag: one of :data:`TAGS` (``counting`` raises the confidence threshold to 0.9).
        include: clauses that must all hold.
        exclude: clauses of which none may hold.
        prompt: the prompt text, if known.
    """

    tag: str
    include: tuple[Clause, ...]
    exclude: tuple[Clause, ...] = ()
    prompt: str | None = None

    @property
    def classes(self) -> list[str]:
        """Every class the spec mentions, in order: the detector's text queries."""
        return list(dict.fromkeys([c.cls for c in self.include] + [c.cls for c in self.exclude]))

    def to_metadata(self) -> dict:
        """The spec as a GenEval metadata dict (the format of GenEval's ``evaluation_metadata.jsonl``)."""
        out: dict[str, Any] = {"tag": self.tag, "include": [c.to_dict() for c in self.include]}
        if self.exclude:
            out["exclude"] = [c.to_dict() for c in self.exclude]
        if self.prompt is not None:
            out["prompt"] = self.prompt
        return out

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any] | str, prompt: str | None = None) -> GenEvalSpec:
        """Reads a GenEval metadata dict (or its JSON text), checking every field.

        A ``counting`` spec without ``exclude`` gets GenEval's ``{class, count + 1}`` exclusion for each
        of its clauses, so counting fails at count + 1 even when the column was dropped on the way
        (a trainer passes only the columns of the batch's first record).

        Raises:
            InvalidInputError: a missing or malformed field, naming it.
        """
        if isinstance(metadata, str):
            try:
                metadata = json.loads(metadata)
            except ValueError as exc:
                raise InvalidInputError(f"GenEval metadata is not valid JSON ({exc}): {metadata[:200]!r}") from None
        if not isinstance(metadata, Mapping):
            raise InvalidInputError(
                f"GenEval metadata must be a dict with 'tag' and 'include'; got {type(metadata).__name__}."
            )
        tag = metadata.get("tag")
        if tag not in TAGS:
            raise InvalidInputError(f"GenEval metadata: 'tag' must be one of {TAGS}; got {tag!r}.")
        include = _clauses(metadata.get("include"), "include", required=True)
        exclude = _clauses(metadata.get("exclude") or [], "exclude", required=False)
        for i, c in enumerate(include):
            if c.position is not None and not 0 <= c.position[1] < i:
                raise InvalidInputError(
                    f"GenEval metadata: include[{i}] is positioned relative to include[{c.position[1]}], "
                    "which must be an earlier clause."
                )
        if tag == "counting" and not exclude:
            exclude = tuple(Clause(c.cls, c.count + 1) for c in include)
        text = metadata.get("prompt", prompt)
        return cls(tag, include, exclude, text if isinstance(text, str) else prompt)


def _clauses(items: Any, where: str, required: bool) -> tuple[Clause, ...]:
    if not isinstance(items, (list, tuple)) or (required and not items):
        raise InvalidInputError(
            f"GenEval metadata: '{where}' must be a list of {{'class', 'count', ...}} dicts"
            + (" with at least one clause" if required else "")
            + f"; got {items!r}."
        )
    out = []
    for j, item in enumerate(items):
        at = f"{where}[{j}]"
        if not isinstance(item, Mapping) or not isinstance(item.get("class"), str) or not item["class"].strip():
            raise InvalidInputError(f"GenEval metadata: {at} needs a 'class' string; got {item!r}.")
        count = item.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InvalidInputError(f"GenEval metadata: {at}['count'] must be an int >= 1; got {count!r}.")
        color = item.get("color")
        if color is not None and not isinstance(color, str):
            raise InvalidInputError(f"GenEval metadata: {at}['color'] must be a string; got {color!r}.")
        position = item.get("position")
        if position is not None:
            if (
                not isinstance(position, (list, tuple))
                or len(position) != 2
                or position[0] not in RELATIONS
                or isinstance(position[1], bool)
                or not isinstance(position[1], int)
            ):
                raise InvalidInputError(
                    f"GenEval metadata: {at}['position'] must be [relation, clause index] with a relation "
                    f"in {RELATIONS}; got {position!r}."
                )
            position = (position[0], int(position[1]))
        if where == "exclude" and (color is not None or position is not None):
            raise InvalidInputError(f"GenEval metadata: {at} is an exclude clause: only 'class' and 'count'.")
        out.append(Clause(item["class"].strip().lower(), count, color, position))
    return tuple(out)


# ----------------------------------------------------------------------------- parsing
def _singular(noun: str, classes: set[str] | None) -> str:
    """The singular of a plural class name (the last word changes: 'wine glasses' -> 'wine glass')."""
    if classes is not None and noun in classes:
        return noun
    *head, last = noun.split(" ")
    if last in _PLURAL_EXCEPTIONS:
        last = _PLURAL_EXCEPTIONS[last]
    elif last.endswith("ies") and len(last) > 4:
        last = last[:-3] + "y"
    elif last.endswith(("ches", "shes", "sses", "xes", "zes")):
        last = last[:-2]
    elif last.endswith("s") and not last.endswith("ss"):
        last = last[:-1]
    return " ".join([*head, last])


_ARTICLE_RE = re.compile(r"^(?P<q>a|an|\d+|" + "|".join(NUMBER_WORDS) + r") (?P<rest>.+)$")
_RELATION_RE = re.compile(r"^(?P<a>.+?) (?:(?:to|on) the )?(?P<rel>left of|right of|above|below) (?P<b>.+)$")


def _object(phrase: str, text: str, classes: set[str] | None, colors: Sequence[str]) -> tuple[Clause, bool]:
    """One object phrase -> (clause, whether an explicit number was given)."""
    m = _ARTICLE_RE.match(phrase)
    if m is None:
        raise _unparseable(text, f"{phrase!r} does not start with 'a', 'an' or a number")
    q, words = m.group("q"), m.group("rest").split(" ")
    numbered = q not in ("a", "an")
    count = 1 if not numbered else (int(q) if q.isdigit() else NUMBER_WORDS[q])
    if count < 1:
        raise _unparseable(text, f"the count in {phrase!r} must be at least 1")
    color = None
    if len(words) > 1 and words[0] in colors:
        color, words = words[0], words[1:]
    noun = " ".join(words)
    if count > 1:
        noun = _singular(noun, classes)
    if classes is not None and noun not in classes:
        near = sorted(c for c in classes if c.split(" ")[-1] == noun.split(" ")[-1] or noun in c)[:5]
        hint = f" (did you mean {', '.join(repr(c) for c in near)}?)" if near else ""
        raise _unparseable(
            text,
            f"{noun!r} is not one of the {len(classes)} known classes{hint}; pass classes=None to accept any "
            "noun, or classes=[...] with your vocabulary",
        )
    if classes is None and (len(words) > 3 or not re.fullmatch(r"[a-z][a-z -]*", noun)):
        raise _unparseable(text, f"{noun!r} does not look like an object name (at most three words)")
    return Clause(noun, count, color), numbered


def _unparseable(text: str, why: str) -> InvalidInputError:
    return InvalidInputError(f"cannot parse the GenEval prompt {text!r}: {why}.\n{ACCEPTED_FORMS}")


def parse_prompt(
    text: str,
    *,
    classes: Sequence[str] | None = GENEVAL_CLASSES,
    colors: Sequence[str] = GENEVAL_COLORS,
) -> GenEvalSpec:
    """Parses a GenEval-style prompt into a :class:`GenEvalSpec` (GenEval's metadata for it).

    The forms (see :data:`ACCEPTED_FORMS`)::

        prompt := ["a photo of "] object | object " and " object | object " " relation " " object
        object := ("a" | "an" | number) [colour " "] class      number: one ... ten, or digits
        relation := "left of" | "right of" | "above" | "below"    ("to the left of" also reads)

    An explicit number makes a counting clause (tag ``counting``, with GenEval's exclusion at
    count + 1); plural class names are made singular ("three wine glasses" -> "wine glass"). The
    tag is ``counting``, ``position``, ``color_attr`` (two objects, a colour), ``colors`` (one object,
    a colour), ``two_object`` or ``single_object``, in that order of precedence. A position prompt
    "A left of B" puts B first, as GenEval's metadata does: ``include = [B, A with ("left of", 0)]``.

    Args:
        text: the prompt.
        classes: the object vocabulary (default GenEval's 80 classes); ``None`` accepts any noun
            phrase of at most three words (for an open-vocabulary detector or another world).
        colors: the colour words (default GenEval's ten).

    Raises:
        InvalidInputError: the text has none of the forms, or names an unknown class; the message
            shows the accepted forms.
    """
    if not isinstance(text, str):
        raise InvalidInputError(f"a GenEval prompt must be a str; got {type(text).__name__}.")
    clean = " ".join(text.strip().lower().rstrip(".").split())
    for prefix in _PREFIXES:
        if clean.startswith(prefix) or clean == prefix.strip():
            clean = clean[len(prefix) :]
            break
    if not clean:
        raise _unparseable(text, "it names no object")
    vocab = None if classes is None else {c.lower() for c in classes}
    colors = tuple(c.lower() for c in colors)
    rel = _RELATION_RE.match(clean)
    if rel is not None:
        subject, sub_n = _object(rel.group("a"), text, vocab, colors)
        target, tgt_n = _object(rel.group("b"), text, vocab, colors)
        if sub_n or tgt_n:
            raise _unparseable(text, "a position prompt relates two single objects ('a dog left of a cat')")
        subject = Clause(subject.cls, 1, subject.color, (rel.group("rel"), 0))
        return GenEvalSpec("position", (target, subject), (), text)
    parts = clean.split(" and ")
    if len(parts) > 2:
        raise _unparseable(text, "at most two objects ('a cat and a dog')")
    parsed = [_object(p, text, vocab, colors) for p in parts]
    include = tuple(c for c, _ in parsed)
    if any(n for _, n in parsed):
        exclude = tuple(Clause(c.cls, c.count + 1) for c, n in parsed if n)
        return GenEvalSpec("counting", include, exclude, text)
    has_color = any(c.color for c in include)
    if len(include) == 2:
        tag = "color_attr" if has_color else "two_object"
    else:
        tag = "colors" if has_color else "single_object"
    return GenEvalSpec(tag, include, (), text)
