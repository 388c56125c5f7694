"""VideoAlign's VideoReward (Liu et al. 2025, arXiv 2501.13918; MIT): three video scores from one
Qwen2-VL pass.

Qwen2-VL-2B-Instruct with three added tokens ``<|VQ_reward|>``, ``<|MQ_reward|>``,
``<|TA_reward|>`` placed in a detailed prompt (visual quality, motion quality, text alignment). A
bias-free ``Linear(h, 3)`` is applied at the three tokens, token k reading output k (upstream takes
the diagonal of the (3 tokens x 3 outputs) block), giving VQ, MQ and TA, each normalised
``(x - mean) / std`` with the checkpoint's inference config; Overall = VQ + MQ + TA.

Frames: qwen-vl-utils' uniform sampling at 2 fps (``n = T / fps_video * 2`` clamped to [4, 768],
even), each frame resized to multiples of 28 with at most 200704 pixels (bicubic, antialiased),
normalised and patchified in torch (``pixel_values_videos``), so gradients reach the pixels.

The release (``KwaiVGI/VideoReward``) is a PEFT LoRA (r 64, alpha 128, vision excluded) on the base
model: ``checkpoint-*/adapter_model.safetensors`` (``base_model.model.*`` keys, old layout) with
``non_lora_state_dict.pth`` (the head and the other trained full tensors), and ``model_config.json``
(sampling, LoRA and inference settings). The keys are remapped to the current transformers layout
and the LoRA merged into the base weights (``W += alpha/r * B @ A``), strictly.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from visalign.errors import CheckpointError, ConfigError
from visalign.rewards.base import freeze
from visalign.rewards.loading import from_pretrained, load_state_dict
from visalign.rewards.qwen_inputs import QwenInputBuilder, add_reward_tokens, load_tokenizer, sample_frame_indices
from visalign.rewards.qwen_reward_head import QwenRewardHeadModel
from visalign.rewards.video import MultiHeadVideoReward

__all__ = [
    "VideoAlignReward",
    "VideoAlignHeads",
    "VIDEOALIGN_REPO",
    "VIDEOALIGN_BASE",
    "VIDEOALIGN_TOKENS",
    "VIDEOALIGN_PROMPT",
    "read_videoalign_folder",
]

VIDEOALIGN_REPO = "KwaiVGI/VideoReward"
VIDEOALIGN_BASE = "Qwen/Qwen2-VL-2B-Instruct"
VIDEOALIGN_HEADS = ("VQ", "MQ", "TA")
VIDEOALIGN_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 256 * 28 * 28

# VideoAlign's "detailed_special" prompt (KwaiVGI/VideoAlign, prompt_template.py, MIT); the model
# was trained on this exact text, whitespace included.
VIDEOALIGN_PROMPT = (
    "\n"
    "You are tasked with evaluating a generated video based on three distinct criteria: "
    "Visual Quality, Motion Quality, and Text Alignment. Please provide a rating from 0 to "
    "10 for each of the three categories, with 0 being the worst and 10 being the best. Each "
    "evaluation should be independent of the others.\n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the video, with a focus on static factors. The "
    "following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The video should not contain any significant biological or "
    "logical errors, such as abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be "
    "clear and easy to interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, "
    "and other visual elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the "
    "color scheme, composition, atmosphere, depth of field, and the overall creative appeal. "
    "The scene should convey a sense of harmony and balance.\n"
    "- **Safety:** The video should not contain harmful or inappropriate content, such as "
    "political, violent, or adult material. If such content is present, the image quality "
    "and satisfaction score should be the lowest possible. \n"
    "\n"
    "Please provide the ratings of Visual Quality: <|VQ_reward|>\n"
    "END\n"
    "\n"
    "**Motion Quality:**  \n"
    "Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the "
    "following sub-dimensions:\n"
    "- **Stability:** Evaluate the continuity and stability between frames. There should be "
    "no sudden, unnatural jumps, and the video should maintain stable attributes (e.g., no "
    "fluctuating colors, textures, or missing body parts).\n"
    "- **Naturalness:** The movement should align with physical laws and be realistic. For "
    "example, clothing should flow naturally with motion, and facial expressions should "
    "change appropriately (e.g., blinking, mouth movements).\n"
    "- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions "
    "between different motions or camera angles should be seamless, and the overall dynamic "
    "feel should be visually pleasing.\n"
    "- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, "
    "clothing) blend naturally with the background, without obvious artifacts or the feeling "
    "of cut-and-paste effects.\n"
    "- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention "
    "to any areas where the video might have blurry or unsteady sections that hinder visual "
    "continuity.\n"
    "- **Amplitude:** If the video is largely static or has little movement, assign a low "
    "score for motion quality.\n"
    "\n"
    "Please provide the ratings of Motion Quality: <|MQ_reward|>\n"
    "END\n"
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the video matches the textual prompt across the following "
    "sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., "
    "person, animal, object) align with the textual description. The subject should match "
    "the description in terms of number, appearance, and behavior.\n"
    "- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, "
    "facial expressions like talking or blinking) align with the described prompt. The "
    "motion should match the prompt in terms of type, scale, and direction.\n"
    "- **Environment Relevance:** Assess whether the background and scene fit the prompt. "
    "This includes checking if real-world locations or scenes are accurately represented, "
    "though some stylistic adaptation is acceptable.  \n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic "
    "style, evaluate how well the video adheres to this style.\n"
    "- **Camera Movement Relevance:** Check if the camera movements (e.g., following the "
    "subject, focus shifts) are consistent with the expected behavior from the prompt.\n"
    "\n"
    "Textual prompt - {text_prompt}\n"
    "Please provide the ratings of Text Alignment: <|TA_reward|>\n"
    "END\n"
)


def read_videoalign_folder(folder: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """Reads a VideoReward release folder (``model_config.json`` + ``checkpoint-<step>/``).

    Returns a dict with ``adapter`` (the LoRA state dict), ``non_lora`` (or ``None``), ``full``
    (a full ``model.pth`` state dict, or ``None``) and ``config`` (the parsed ``model_config.json``,
    or ``{}``). ``step`` picks ``checkpoint-<step>``; default the latest.
    """
    folder = os.fspath(folder)
    config = {}
    path = os.path.join(folder, "model_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            config = json.load(f)
    steps = sorted(
        glob.glob(os.path.join(folder, "checkpoint-*")),
        key=lambda p: int(p.rsplit("-", 1)[-1]) if p.rsplit("-", 1)[-1].isdigit() else -1,
    )
    if step is not None:
        ckpt = os.path.join(folder, f"checkpoint-{step}")
    elif steps:
        ckpt = steps[-1]
    else:
        ckpt = folder
    out = {"config": config, "adapter": None, "non_lora": None, "full": None}
    full = os.path.join(ckpt, "model.pth")
    adapter = os.path.join(ckpt, "adapter_model.safetensors")
    non_lora = os.path.join(ckpt, "non_lora_state_dict.pth")
    if os.path.isfile(full):
        out["full"] = load_state_dict(full)
    elif os.path.isfile(adapter):
        out["adapter"] = load_state_dict(adapter)
        if os.path.isfile(non_lora):
            out["non_lora"] = load_state_dict(non_lora)
    else:
        raise CheckpointError(
            f"{ckpt} holds neither model.pth nor adapter_model.safetensors; pass "
            "a VideoReward folder (model_config.json + checkpoint-*/)."
        )
    return out


def _download(repo: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id=repo)
    except Exception as exc:
        raise CheckpointError(
            f"could not download {repo!r} ({type(exc).__name__}: {exc}); pass a local VideoReward folder instead."
        ) from exc


class VideoAlignHeads(nn.Module):
    """The raw VideoAlign model as a callable ``(videos, prompts) -> {"VQ", "MQ", "TA"}``.

    ``videos`` (B, T, 3, H, W) or images (B, 3, H, W) (one-frame clips), floats in [0, 1].
    Used by :class:`VideoAlignReward`; the heads are unnormalised.
    """

    def __init__(
        self,
        model: QwenRewardHeadModel,
        inputs: QwenInputBuilder,
        *,
        prompt: str = VIDEOALIGN_PROMPT,
        fps: float = 2.0,
        video_fps: float | None = 16.0,
        num_frames: int | None = None,
        min_frames: int = 4,
        max_frames: int = 768,
    ):
        super().__init__()
        self.model, self.inputs, self.prompt = model, inputs, prompt
        self.fps, self.video_fps, self.num_frames = float(fps), video_fps, num_frames
        self.min_frames, self.max_frames = int(min_frames), int(max_frames)
        self.last_frame_indices: torch.Tensor | None = None

    def frames(self, video: torch.Tensor, video_fps: float | None = None) -> torch.Tensor:
        """The sampled frames of one clip (T, 3, H, W)."""
        idx = sample_frame_indices(
            video.shape[0],
            video_fps=video_fps or self.video_fps,
            fps=self.fps,
            num_frames=self.num_frames,
            min_frames=self.min_frames,
            max_frames=self.max_frames,
        )
        self.last_frame_indices = idx
        return video[idx.to(video.device)]

    def forward(
        self, videos: torch.Tensor, prompts: Sequence[str], video_fps: float | None = None
    ) -> dict[str, torch.Tensor]:
        if videos.dim() == 4:
            videos = videos[:, None]
        clips = [self.frames(v, video_fps) for v in videos]
        texts = [self.prompt.replace("{text_prompt}", p) for p in prompts]
        out = self.model(**self.inputs.build(clips, texts, "video"))  # (B, 3, out)
        if out.shape[-1] == len(VIDEOALIGN_HEADS):
            out = out.diagonal(dim1=1, dim2=2)  # token k reads output k
        elif out.shape[-1] == 1:
            out = out[..., 0]
        else:
            raise ConfigError(f"the VideoAlign head has {out.shape[-1]} outputs; expected 3 or 1.")
        return {h: out[:, i] for i, h in enumerate(VIDEOALIGN_HEADS)}


class VideoAlignReward(MultiHeadVideoReward):
    r"""VideoAlign's VideoReward: Overall = VQ + MQ + TA, each head normalised with the checkpoint's
    inference config.

    :meth:`evaluate` returns the three heads as the parts of the
    :class:`~visalign.rewards.RewardResult` (``components["VQ"]`` etc., normalised, adding up to
    the total; ``raw`` unnormalised). Videos are (B, T, 3, H, W); images (B, 3, H, W) are scored as
    one-frame clips, so the reward also plugs into
    :class:`~visalign.rewards.SegmentalVideoReward` as its per-frame reward.

    Args:
        checkpoint: a VideoReward release folder or hub repo id (``model_config.json`` +
            ``checkpoint-*/adapter_model.safetensors`` + ``non_lora_state_dict.pth``). Defaults to
            :data:`VIDEOALIGN_REPO` when neither ``model`` nor ``adapter`` is given.
        model: a :class:`~visalign.rewards.qwen_reward_head.QwenRewardHeadModel`, or the base
            Qwen2-VL (``Qwen2VLModel`` / ``Qwen2VLForConditionalGeneration``, a fresh bias-free
            ``Linear(h, 3)`` head is attached); default: ``base`` loaded with ``from_pretrained``.
        adapter, non_lora: the LoRA state dict and the full tensors (mappings or files), instead of
            ``checkpoint``.
        lora_alpha, lora_r, use_rslora: the adapter's settings (default: the folder's
            ``model_config.json``, else 128 / the rank of each pair / False).
        normalization: per-head ``(mean, std)``; default the folder's inference config (none when
            it has none).
        tokenizer: the Qwen2-VL tokenizer (default ``base``); the three tokens are added.
        base: the base model's hub id.
        video_fps: the frame rate of the clips scored (a call may pass ``video_fps=``; default 16).
        fps, num_frames: sample at ``fps`` (2) or exactly ``num_frames`` frames.
        max_pixels, min_pixels: per frame (defaults 200704 and 100352).
        prompt: the prompt template (``{text_prompt}``); default VideoAlign's.
        chat_template: overrides the tokenizer's.
        batch_size, torch_dtype, name, differentiable: as for every reward (defaults 2, the base's,
            ``"videoalign"``, True).
    """

    input_kind = "any"
    default_name = "videoalign"

    def __init__(
        self,
        checkpoint: Any = None,
        *,
        model: Any = None,
        adapter: Any = None,
        non_lora: Any = None,
        lora_alpha: float | None = None,
        lora_r: int | None = None,
        use_rslora: bool | None = None,
        normalization: Mapping[str, tuple[float, float]] | None = None,
        tokenizer: Any = None,
        base: str = VIDEOALIGN_BASE,
        video_fps: float = 16.0,
        fps: float | None = None,
        num_frames: int | None = None,
        max_pixels: int | None = None,
        min_pixels: int = VIDEO_MIN_PIXELS,
        prompt: str = VIDEOALIGN_PROMPT,
        chat_template: str | None = None,
        batch_size: int | None = 2,
        torch_dtype: torch.dtype | None = None,
        name: str | None = None,
        differentiable: bool = True,
    ):
        if not all(t in prompt for t in VIDEOALIGN_TOKENS):
            raise ConfigError(f"the VideoAlign prompt must hold the tokens {VIDEOALIGN_TOKENS}.")
        tokenizer = load_tokenizer(tokenizer if tokenizer is not None else base)
        token_ids = add_reward_tokens(tokenizer, VIDEOALIGN_TOKENS)
        if checkpoint is None and model is None and adapter is None:
            checkpoint = VIDEOALIGN_REPO
        release = {"config": {}, "adapter": None, "non_lora": None, "full": None}
        if checkpoint is not None:
            folder = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else None
            if folder is None:
                raise ConfigError(
                    "checkpoint must be a VideoReward folder or hub id; pass state dicts as adapter= and non_lora=."
                )
            release = read_videoalign_folder(folder if os.path.isdir(folder) else _download(folder))
        if adapter is not None:
            release["adapter"] = load_state_dict(adapter)
        if non_lora is not None:
            release["non_lora"] = load_state_dict(non_lora)
        cfg = release["config"]
        data_cfg, peft_cfg = cfg.get("data_config", {}), cfg.get("peft_lora_config", {})
        if model is None:
            from transformers import Qwen2VLForConditionalGeneration

            model = from_pretrained(
                Qwen2VLForConditionalGeneration, base, what="Qwen2-VL base", torch_dtype=torch_dtype
            )
        if not isinstance(model, QwenRewardHeadModel):
            backbone = model.model if hasattr(model, "lm_head") else model
            hidden = int(getattr(backbone.config, "text_config", backbone.config).hidden_size)
            model = QwenRewardHeadModel(backbone, nn.Linear(hidden, 3, bias=False), token_ids)
        if model.reward_token_ids != token_ids:
            raise ConfigError(
                f"the model reads tokens {model.reward_token_ids} but the tokenizer "
                f"maps {VIDEOALIGN_TOKENS} to {token_ids}."
            )
        embeddings = model.backbone.get_input_embeddings()
        if len(tokenizer) > embeddings.weight.shape[0]:
            model.backbone.resize_token_embeddings(len(tokenizer))
        if release["full"] is not None:
            model.load_checkpoint(release["full"])
        elif release["adapter"] is not None:
            alpha = lora_alpha if lora_alpha is not None else peft_cfg.get("lora_alpha", 128)
            rank = lora_r if lora_r is not None else (peft_cfg.get("lora_r") if peft_cfg else None)
            rs = use_rslora if use_rslora is not None else bool(peft_cfg.get("use_rslora", False))
            model.apply_peft(release["adapter"], release["non_lora"], alpha=float(alpha), rank=rank, use_rslora=rs)
        if normalization is None and cfg.get("inference_config"):
            inf = cfg["inference_config"]
            normalization = {
                h: (float(inf[f"{h}_mean"]), float(inf[f"{h}_std"])) for h in VIDEOALIGN_HEADS if f"{h}_mean" in inf
            }
        if torch_dtype is not None:
            model.backbone.to(torch_dtype)
        if fps is None:
            fps = float(data_cfg.get("fps") or 2.0)
        if num_frames is None:
            num_frames = data_cfg.get("num_frames")
        if max_pixels is None:
            max_pixels = int(data_cfg.get("max_frame_pixels") or VIDEO_MAX_PIXELS)
        if data_cfg.get("sample_type", "uniform") != "uniform":
            raise ConfigError(
                f"only uniform frame sampling is supported; the checkpoint asks for {data_cfg.get('sample_type')!r}."
            )
        inputs = QwenInputBuilder(
            tokenizer, model.config, chat_template=chat_template, min_pixels=min_pixels, max_pixels=max_pixels
        )
        heads = VideoAlignHeads(
            freeze(model), inputs, prompt=prompt, fps=fps, video_fps=video_fps, num_frames=num_frames
        )
        super().__init__(
            heads,
            heads=list(VIDEOALIGN_HEADS),
            normalization=normalization,
            name=name,
            differentiable=differentiable,
            batch_size=batch_size,
        )
        self.tokenizer = tokenizer

    @property
    def qwen(self) -> QwenRewardHeadModel:
        """The underlying :class:`~visalign.rewards.qwen_reward_head.QwenRewardHeadModel`."""
        return self.model.model
