"""Qwen2-VL inputs built in torch: frame sampling, the 28-multiple resize, patches in Qwen2-VL's layout,
and the chat prompt with the image/video placeholder expanded (no torchvision; differentiable in the pixels).

Frames of a video are sampled as qwen-vl-utils does (:func:`sample_frame_indices`): ``n = T / fps_video
* 2``, clamped to [4, 768] and to the clip, rounded to an even count, taken at
``linspace(0, T-1, n).round()``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from visalign.errors import ConfigError, InvalidInputError
from visalign.rewards.preprocess import CLIP_MEAN, CLIP_STD, normalize, resize

__all__ = [
    "IMAGE_FACTOR",
    "QWEN2VL_CHAT_TEMPLATE_FALLBACK",
    "QwenInputBuilder",
    "add_reward_tokens",
    "load_tokenizer",
    "patchify",
    "sample_frame_indices",
    "smart_resize",
]

IMAGE_FACTOR = 28
FRAME_FACTOR = 2

# What Qwen2-VL-Instruct's chat template renders for one user turn holding one image (or video)
# followed by text, with the generation prompt; used when the tokenizer has no chat template.
QWEN2VL_CHAT_TEMPLATE_FALLBACK = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|>{placeholder}<|vision_end|>{text}<|im_end|>\n"
    "<|im_start|>assistant\n"
)


# ----------------------------------------------------------------------------- geometry
def _round_by(x: float, f: int) -> int:
    return round(x / f) * f


def _ceil_by(x: float, f: int) -> int:
    return math.ceil(x / f) * f


def _floor_by(x: float, f: int) -> int:
    return math.floor(x / f) * f


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = 4 * 28 * 28,
    max_pixels: int = 16384 * 28 * 28,
) -> tuple[int, int]:
    """The (height, width) qwen-vl-utils resizes to: multiples of ``factor``, the pixel count in
    [``min_pixels``, ``max_pixels``], the aspect ratio kept as closely as possible.

    Raises:
        InvalidInputError: the aspect ratio exceeds 200.
    """
    if max(height, width) / min(height, width) > 200:
        raise InvalidInputError(f"Qwen2-VL needs an aspect ratio below 200; got {height}x{width}.")
    h = max(factor, _round_by(height, factor))
    w = max(factor, _round_by(width, factor))
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = _floor_by(height / beta, factor)
        w = _floor_by(width / beta, factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = _ceil_by(height * beta, factor)
        w = _ceil_by(width * beta, factor)
    return h, w


def sample_frame_indices(
    total_frames: int,
    *,
    video_fps: float | None = None,
    fps: float = 2.0,
    num_frames: int | None = None,
    min_frames: int = 4,
    max_frames: int = 768,
) -> torch.Tensor:
    """Which frames a Qwen2-VL video reward looks at (qwen-vl-utils' uniform sampling).

    With ``num_frames`` the count is that, rounded to even; otherwise ``n = total / video_fps * fps``
    clamped to [``min_frames``, ``min(max_frames, total)``] (bounds made even) and rounded to
    even. ``n`` never exceeds ``total_frames``; a single frame gives ``[0]`` (the patchifier then
    repeats it to fill the temporal patch). The frames are ``linspace(0, total - 1, n).round()``.

    Returns:
        `torch.LongTensor`: (n,) frame indices.
    """
    if total_frames < 1:
        raise InvalidInputError(f"a video needs at least one frame; got {total_frames}.")
    if num_frames is not None:
        n = _round_by(num_frames, FRAME_FACTOR)
    else:
        if video_fps is None or video_fps <= 0:
            raise ConfigError(f"sampling at {fps} fps needs the clip's frame rate video_fps > 0; got {video_fps}.")
        lo = _ceil_by(min_frames, FRAME_FACTOR)
        hi = _floor_by(min(max_frames, total_frames), FRAME_FACTOR)
        n = total_frames / video_fps * fps
        n = _round_by(min(max(n, lo), hi), FRAME_FACTOR)
    n = min(n, total_frames)
    if n < FRAME_FACTOR:
        return torch.zeros(1, dtype=torch.long)
    return torch.linspace(0, total_frames - 1, n).round().long()


def patchify(
    frames: torch.Tensor, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Qwen2-VL's flat patch layout of normalised frames, in torch (differentiable).

    Args:
        frames: (T, C, H, W), already normalised, H and W multiples of ``patch_size * merge_size``.
            T is padded to a multiple of ``temporal_patch_size`` by repeating the last frame (one
            image becomes two identical frames, as the image processor does).

    Returns:
        ``(patches, (t, h, w))``: patches (t*h*w, C*temporal_patch_size*patch_size**2) ordered by
        merge window (row-major), then position inside the window; each patch flattened as
        (C, temporal, patch row, patch column). ``(t, h, w)`` is the grid (``*_grid_thw``).
    """
    t, c, height, width = frames.shape
    step = patch_size * merge_size
    if height % step or width % step:
        raise InvalidInputError(
            f"frames of {height}x{width} are not multiples of {step}; resize them with smart_resize first."
        )
    pad = (-t) % temporal_patch_size
    if pad:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)], dim=0)
        t += pad
    gt, gh, gw = t // temporal_patch_size, height // patch_size, width // patch_size
    x = frames.reshape(
        gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size
    )
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size), (gt, gh, gw)


# ----------------------------------------------------------------------------- inputs
class QwenInputBuilder:
    """Builds Qwen2-VL inputs from [0, 1] pixels and prompt texts, in torch.

    Args:
        tokenizer: the model's tokenizer, with the reward tokens and ``<|image_pad|>`` /
            ``<|video_pad|>`` as (special) tokens.
        config: the model config (``image_token_id``, ``video_token_id``, the vision patch sizes).
        chat_template: a Jinja chat template; defaults to the tokenizer's, else the Qwen2-VL
            format of :data:`QWEN2VL_CHAT_TEMPLATE_FALLBACK`.
        min_pixels, max_pixels: the resize bounds of :func:`smart_resize` per image or frame.
        mean, std: the normalisation (OpenAI CLIP's, as Qwen2-VL).
    """

    def __init__(
        self,
        tokenizer: Any,
        config: Any,
        *,
        chat_template: str | None = None,
        min_pixels: int = 4 * 28 * 28,
        max_pixels: int = 16384 * 28 * 28,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ):
        self.tokenizer = tokenizer
        vcfg = getattr(config, "vision_config", config)
        self.patch_size = int(getattr(vcfg, "patch_size", 14))
        self.temporal_patch_size = int(getattr(vcfg, "temporal_patch_size", 2))
        self.merge_size = int(getattr(vcfg, "spatial_merge_size", 2))
        self.factor = self.patch_size * self.merge_size
        self.image_token_id = int(config.image_token_id)
        self.video_token_id = int(config.video_token_id)
        for token, tid in (("<|image_pad|>", self.image_token_id), ("<|video_pad|>", self.video_token_id)):
            got = tokenizer.convert_tokens_to_ids(token)
            if got != tid:
                raise ConfigError(
                    f"the tokenizer maps {token} to {got} but the model expects "
                    f"{tid}; pass the tokenizer the model was trained with."
                )
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.mean, self.std = tuple(mean), tuple(std)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            raise ConfigError("the tokenizer has no pad token; Qwen2-VL's is <|endoftext|>.")
        self.pad_token_id = int(pad)

    # -- text -----------------------------------------------------------------------------------
    def render(self, text: str, kind: str = "image") -> str:
        """One user turn (the image or video, then ``text``) with the generation prompt."""
        if self.chat_template:
            messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": text}]}]
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
            )
        placeholder = "<|image_pad|>" if kind == "image" else "<|video_pad|>"
        return QWEN2VL_CHAT_TEMPLATE_FALLBACK.format(placeholder=placeholder, text=text)

    def tokenize(
        self, texts: Sequence[str], tokens_per_sample: Sequence[int], kind: str, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Token ids with each placeholder expanded to its vision token count, right-padded."""
        placeholder = self.image_token_id if kind == "image" else self.video_token_id
        rows = []
        for text, n in zip(texts, tokens_per_sample):
            ids = list(self.tokenizer(text)["input_ids"])
            at = [i for i, t in enumerate(ids) if t == placeholder]
            if len(at) != 1:
                raise ConfigError(
                    f"the rendered prompt holds {len(at)} {kind} placeholders; the "
                    "chat template must emit exactly one (<|vision_start|><|"
                    f"{kind}_pad|><|vision_end|>)."
                )
            i = at[0]
            rows.append(ids[:i] + [placeholder] * int(n) + ids[i + 1 :])
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for j, r in enumerate(rows):
            input_ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[j, : len(r)] = 1
        return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}

    # -- pixels ---------------------------------------------------------------------------------
    def pixels(self, frames: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(T, 3, H, W) [0, 1] frames -> (patches, grid): resized to :func:`smart_resize`'s size
        (bicubic, antialiased), normalised, patchified. Differentiable.
        """
        h, w = smart_resize(frames.shape[-2], frames.shape[-1], self.factor, self.min_pixels, self.max_pixels)
        x = resize(frames.float(), (h, w), mode="bicubic", antialias=True)
        x = normalize(x, self.mean, self.std)
        return patchify(x, self.patch_size, self.temporal_patch_size, self.merge_size)

    def build(
        self, clips: Sequence[torch.Tensor], texts: Sequence[str], kind: str = "image"
    ) -> dict[str, torch.Tensor]:
        """Model inputs for one clip (T, 3, H, W) per text: an image is a 1-frame clip.

        Returns ``input_ids``, ``attention_mask`` and ``pixel_values`` + ``image_grid_thw``
        (``kind="image"``) or ``pixel_values_videos`` + ``video_grid_thw`` (``kind="video"``).
        """
        if kind not in ("image", "video"):
            raise ConfigError(f"kind must be 'image' or 'video'; got {kind!r}.")
        patches, grids = [], []
        for clip in clips:
            p, g = self.pixels(clip)
            patches.append(p)
            grids.append(g)
        device = clips[0].device
        merge = self.merge_size**2
        counts = [t * h * w // merge for t, h, w in grids]
        out = self.tokenize([self.render(t, kind) for t in texts], counts, kind, device)
        grid = torch.tensor(grids, dtype=torch.long, device=device)
        if kind == "image":
            out.update(pixel_values=torch.cat(patches), image_grid_thw=grid)
        else:
            out.update(pixel_values_videos=torch.cat(patches), video_grid_thw=grid)
        return out


# ----------------------------------------------------------------------------- loading helpers
def add_reward_tokens(tokenizer: Any, tokens: Sequence[str]) -> list[int]:
    """Adds the reward tokens as special tokens (when absent) and returns their ids, as upstream
    does with ``add_special_tokens({"additional_special_tokens": tokens})``.
    """
    vocab = tokenizer.get_vocab()
    new = [t for t in tokens if t not in vocab]
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": list(new)})
    return [int(tokenizer.convert_tokens_to_ids(t)) for t in tokens]


def load_tokenizer(source: Any) -> Any:
    """A tokenizer object from a hub id / folder (``AutoTokenizer``), or the object itself."""
    if isinstance(source, (str, os.PathLike)):
        from transformers import AutoTokenizer

        from visalign.rewards.loading import from_pretrained

        return from_pretrained(AutoTokenizer, source, what="Qwen2-VL tokenizer")
    return source
