"""Adapters for Wan 2.2: the two-expert A14B models (``wan22``, ``wan22-i2v``) and TI2V-5B
(``wan22-ti2v``, ``wan22-ti2v-i2v``). They load as the Wan 2.1 pipeline classes; the registry picks
the adapter by variant (:func:`visalign.pipelines.wan.wan_variant`).

**Two experts** (``WanPipeline`` / ``WanImageToVideoPipeline`` with ``transformer_2`` and
``boundary_ratio``, e.g. ``Wan-AI/Wan2.2-T2V-A14B-Diffusers``):

- ``transformer`` (the high-noise expert) runs while ``t ≥ boundary_ratio · num_train_timesteps``,
  ``transformer_2`` (the low-noise expert) after, as stock does. The low-noise expert's CFG scale is
  ``guidance_scale_2`` (``va.sample(..., guidance_scale_2=3.0)`` or ``va.wrap(pipe, guidance_scale_2=3.0)``;
  default: ``guidance_scale``, as stock).
- Sampling, log-prob recomputation and training all call :class:`ExpertRouter`, which sends every row
  of a batch to the expert of its timestep. A log-prob batch that mixes high- and low-noise steps is
  one call, so a trainer prepares one module holding both experts
  (:meth:`~visalign.pipelines.Policy.training_module`) and DDP sees one forward per backward.
- LoRA goes on both experts, either one LoRA per expert (``expert_lora="per_expert"``, the default)
  or one LoRA shared by both (``expert_lora="shared"``: the low-noise expert's LoRA layers are the
  high-noise expert's, so one set of weights is trained and exported twice). Choose with
  ``va.wrap(pipe, expert_lora="shared")``.
- ``policy.save_lora(folder)`` writes ``folder/pytorch_lora_weights.safetensors`` (``transformer``) and
  ``folder/pytorch_lora_weights_transformer_2.safetensors``. A stock pipeline loads them with::

      pipe.load_lora_weights(folder)
      pipe.load_lora_weights(folder, weight_name="pytorch_lora_weights_transformer_2.safetensors",
                             load_into_transformer_2=True)

  and ``policy.load_lora(folder)`` does both (and refuses a folder that holds one expert's LoRA only).
  (A ``transformer_2/`` subfolder would not do: diffusers reads a top-level file of the same name first.)

**TI2V-5B** (``expand_timesteps=True``: one transformer, the Wan 2.2 VAE with 16x spatial
compression and 48 channels, ``Wan-AI/Wan2.2-TI2V-5B-Diffusers``):

- the timestep is given per token, as stock does;
- ``wan22-ti2v`` is text-to-video (``WanPipeline``, what ``va.load`` gives for the checkpoint);
  ``wan22-ti2v-i2v`` is image-to-video (``WanImageToVideoPipeline.from_pretrained(...)`` then
  ``va.wrap``). There the first latent frame is the clean VAE latent c of the image: the denoiser
  sees it with timestep 0 while the other frames carry t. visalign's state keeps a first frame that
  moves from the noise to c on the straight path (velocity (x − c)/σ, so x̂0 = c): it does not depend
  on the weights (no gradient, log-prob ratio exactly 1), and the last step lands on c, which is
  what stock returns (it pastes c over the first frame at the end).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from visalign.errors import ConfigError, InvalidInputError, UnsupportedPipelineError
from visalign.pipelines.base import Conditioning, Geometry
from visalign.pipelines.registry import register_adapter
from visalign.pipelines.wan import WanI2VPolicy, WanT2VPolicy, _WanPolicy

EXPERT_LORA = ("per_expert", "shared")
#: The file of the low-noise expert's LoRA, beside ``pytorch_lora_weights.safetensors`` (the high-noise one's).
TRANSFORMER_2_WEIGHT_NAME = "pytorch_lora_weights_transformer_2.safetensors"


@dataclass
class ExpertConditioning(Conditioning):
    """A :class:`Conditioning` with the low-noise expert's CFG scale (None: ``guidance_scale``)."""

    guidance_scale_2: float | None = None


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


class ExpertRouter(torch.nn.Module):
    """Both Wan 2.2 experts as one module: each row runs through the expert of its timestep.

    ``forward(hidden_states=…, timestep=(B,), **kwargs)`` takes the transformer's keyword arguments;
    rows with ``timestep ≥ boundary`` go to ``transformer``, the others to ``transformer_2``, and the
    outputs come back in the batch's order. A batch of one expert is a plain call of that expert,
    exactly as stock calls it. Under DDP with gradients, an expert with no rows is tied into the
    graph with a zero term, so that every rank reduces the gradients of both experts.
    """

    def __init__(self, transformer: torch.nn.Module, transformer_2: torch.nn.Module, boundary: float):
        super().__init__()
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.boundary = float(boundary)

    def experts(self, timestep: torch.Tensor) -> torch.Tensor:
        """(B,) bool: True for the rows of the high-noise expert (the comparison stock makes, in float32)."""
        t = timestep if timestep.ndim == 1 else timestep.amax(dim=tuple(range(1, timestep.ndim)))
        return t >= self.boundary

    @staticmethod
    def _rows(kwargs: dict, index: torch.Tensor, batch: int) -> dict:
        return {
            k: v[index] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch else v
            for k, v in kwargs.items()
        }

    def _tie_idle(self, out: torch.Tensor, idle: torch.nn.Module) -> torch.Tensor:
        if not (torch.is_grad_enabled() and _distributed()):
            return out
        params = [p for p in idle.parameters() if p.requires_grad]
        if not params:
            return out
        return out + 0.0 * sum(p.sum() for p in params).to(out.dtype)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, return_dict: bool = False, **kwargs):
        if return_dict:
            raise ConfigError("ExpertRouter returns a tuple; call it with return_dict=False.")
        high = self.experts(timestep)
        batch = hidden_states.shape[0]
        if bool(high.all()) or not bool(high.any()):
            experts = (self.transformer, self.transformer_2)
            expert, idle = experts if bool(high[0]) else experts[::-1]
            out = expert(hidden_states=hidden_states, timestep=timestep, return_dict=False, **kwargs)[0]
            return (self._tie_idle(out, idle),)
        rows_high, rows_low = torch.nonzero(high).flatten(), torch.nonzero(~high).flatten()
        out_high = self.transformer(
            hidden_states=hidden_states[rows_high],
            timestep=timestep[rows_high],
            return_dict=False,
            **self._rows(kwargs, rows_high, batch),
        )[0]
        out_low = self.transformer_2(
            hidden_states=hidden_states[rows_low],
            timestep=timestep[rows_low],
            return_dict=False,
            **self._rows(kwargs, rows_low, batch),
        )[0]
        order = torch.argsort(torch.cat([rows_high, rows_low]))
        return (torch.cat([out_high, out_low])[order],)


class _TwoExperts:
    """What the two-expert adapters add to the Wan 2.1 ones (see the module docstring)."""

    wan_variant = "experts"
    _denoiser_kind = "expert"

    def __init__(
        self,
        pipe,
        max_sequence_length: int = 512,
        expert_lora: str = "per_expert",
        guidance_scale_2: float | None = None,
    ):
        if expert_lora not in EXPERT_LORA:
            raise ConfigError(
                f"expert_lora={expert_lora!r} is not an option; use 'per_expert' (one LoRA for each expert) "
                f"or 'shared' (one LoRA that both experts use)."
            )
        self.expert_lora = expert_lora
        self.guidance_scale_2 = guidance_scale_2
        self._router: ExpertRouter | None = None
        _WanPolicy.__init__(self, pipe, max_sequence_length)

    def _validate_pipeline(self) -> None:
        pipe, name = self.pipe, type(self.pipe).__name__
        boundary = pipe.config.get("boundary_ratio")
        if getattr(pipe, "transformer", None) is None:
            raise UnsupportedPipelineError(
                f"This {name} has no 'transformer' (the high-noise expert); stock would fail at the first "
                f"step too. Load both experts (e.g. {name}.from_pretrained('Wan-AI/Wan2.2-T2V-A14B-Diffusers'))."
            )
        if getattr(pipe, "transformer_2", None) is None:
            raise UnsupportedPipelineError(
                f"This {name} has boundary_ratio={boundary} but no 'transformer_2': the low-noise expert that "
                f"runs below the boundary is missing, so a two-expert model cannot be sampled or trained. Load "
                f"the full checkpoint (both experts), or use one expert throughout with "
                f"pipe.register_to_config(boundary_ratio=None)."
            )
        if boundary is None:
            raise UnsupportedPipelineError(
                f"This {name} has a 'transformer_2' but boundary_ratio=None, so stock never runs the second "
                f"expert. Set the switch point, e.g. pipe.register_to_config(boundary_ratio=0.875) for "
                f"Wan 2.2 T2V-A14B (0.9 for I2V-A14B), or drop transformer_2 (pipe.transformer_2 = None)."
            )
        if not 0.0 < float(boundary) < 1.0:
            raise UnsupportedPipelineError(f"boundary_ratio must lie in (0, 1); this {name} has {boundary}.")
        if self.expert_lora == "shared" and dict(pipe.transformer.config) != dict(pipe.transformer_2.config):
            raise ConfigError(
                "expert_lora='shared' needs two experts of the same architecture (one set of LoRA weights "
                "serves both); these transformers' configs differ. Use expert_lora='per_expert'."
            )

    @property
    def boundary_timestep(self) -> float:
        """``boundary_ratio · num_train_timesteps``: the high-noise expert runs at t ≥ this."""
        return float(self.pipe.config.boundary_ratio) * self.pipe.scheduler.config.num_train_timesteps

    def trainable_denoisers(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.pipe.transformer, "transformer_2": self.pipe.transformer_2}

    def training_module(self) -> ExpertRouter:
        pipe, router = self.pipe, self._router
        stale = (
            router is None
            or router.transformer is not pipe.transformer
            or router.transformer_2 is not pipe.transformer_2
            or router.boundary != self.boundary_timestep
        )
        if stale:
            router = self._router = ExpertRouter(pipe.transformer, pipe.transformer_2, self.boundary_timestep)
        return router

    def guidance_scale_at(self, timesteps, conditioning):
        first, second = conditioning.guidance_scale, getattr(conditioning, "guidance_scale_2", None)
        if second is None or second == first:
            return first
        high = torch.as_tensor(timesteps).reshape(-1) >= self.boundary_timestep
        if bool(high.all()):
            return first
        if not bool(high.any()):
            return second
        return torch.where(
            high, torch.tensor(float(first), device=high.device), torch.tensor(float(second), device=high.device)
        )

    def encode_prompt(
        self,
        prompts,
        negative_prompts=None,
        guidance_scale=None,
        images=None,
        geometry=None,
        guidance_scale_2=None,
        **kwargs,
    ) -> ExpertConditioning:
        conditioning = super().encode_prompt(
            prompts, negative_prompts, guidance_scale, images=images, geometry=geometry, **kwargs
        )
        second = self.guidance_scale_2 if guidance_scale_2 is None else guidance_scale_2
        fields = {f.name: getattr(conditioning, f.name) for f in dataclasses.fields(Conditioning)}
        return ExpertConditioning(**fields, guidance_scale_2=None if second is None else float(second))

    # ----------------------------------------------------------------- LoRA on both experts
    def add_lora(self, *args, adapter_name: str = "default", **kwargs) -> None:
        """Attaches LoRA to both experts: independent (``expert_lora="per_expert"``) or shared."""
        _WanPolicy.add_lora(self, *args, adapter_name=adapter_name, **kwargs)
        if self.expert_lora == "shared":
            self._share_lora(adapter_name)

    def _share_lora(self, adapter_name: str) -> None:
        from peft.tuners.lora import LoraLayer

        high = dict(self.pipe.transformer.named_modules())
        for name, module in self.pipe.transformer_2.named_modules():
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                twin = high[name]
                module.lora_A[adapter_name] = twin.lora_A[adapter_name]
                module.lora_B[adapter_name] = twin.lora_B[adapter_name]

    def _write_lora(self, save_directory, name, state, metadata) -> None:
        # Stock loads the second expert's LoRA from "transformer."-prefixed keys with
        # load_into_transformer_2=True, so each expert gets its own file under the same prefix.
        weight_name = None if name == "transformer" else TRANSFORMER_2_WEIGHT_NAME
        type(self.pipe).save_lora_weights(
            save_directory,
            transformer_lora_layers=state,
            weight_name=weight_name,
            transformer_lora_adapter_metadata=metadata,
            safe_serialization=True,
        )

    def load_lora(self, path: str, adapter_name: str | None = None) -> None:
        """Loads a two-expert LoRA written by :meth:`save_lora` into both experts."""
        if os.path.isdir(path) and not os.path.exists(os.path.join(path, TRANSFORMER_2_WEIGHT_NAME)):
            raise ConfigError(
                f"{path} holds a LoRA for one expert only (no {TRANSFORMER_2_WEIGHT_NAME}), but {self.family} "
                f"has two experts and both are needed. Pass a folder written by policy.save_lora() or "
                f"trainer.save_lora(); to put a single-expert LoRA into one expert on purpose, call "
                f"policy.pipe.load_lora_weights(path) (high-noise expert) or "
                f"policy.pipe.load_lora_weights(path, load_into_transformer_2=True) (low-noise expert)."
            )
        self.pipe.load_lora_weights(path, adapter_name=adapter_name)
        self.pipe.load_lora_weights(
            path, weight_name=TRANSFORMER_2_WEIGHT_NAME, adapter_name=adapter_name, load_into_transformer_2=True
        )


@register_adapter
class Wan22Policy(_TwoExperts, WanT2VPolicy):
    """Wan 2.2 A14B text-to-video (``WanPipeline`` with ``transformer_2`` and ``boundary_ratio``): two experts."""

    family = "wan22"
    pipeline_class_names = ("WanPipeline",)


@register_adapter
class Wan22I2VPolicy(_TwoExperts, WanI2VPolicy):
    """Wan 2.2 A14B image-to-video (``WanImageToVideoPipeline`` with two experts)."""

    family = "wan22-i2v"
    pipeline_class_names = ("WanImageToVideoPipeline",)


def _token_timesteps(timesteps: torch.Tensor, latents: torch.Tensor, patch: tuple, clean_first: bool) -> torch.Tensor:
    """Per-token timesteps (B, F'·h'·w') as stock builds them: ``t`` everywhere, 0 on a clean first frame."""
    frames, height, width = latents.shape[2:]
    mask = torch.ones(frames, height, width, device=latents.device, dtype=torch.float32)
    if clean_first:
        mask[0] = 0
    tokens = mask[:: patch[0], :: patch[1], :: patch[2]].flatten()
    return tokens.unsqueeze(0) * timesteps.float().reshape(-1, 1)


def _refuse_ti2v_with_experts(pipe) -> None:
    if getattr(pipe, "transformer_2", None) is not None or pipe.config.get("boundary_ratio") is not None:
        raise UnsupportedPipelineError(
            f"This {type(pipe).__name__} has expand_timesteps=True (Wan 2.2 TI2V) and a second expert "
            f"(transformer_2 or boundary_ratio): no released Wan 2.2 model combines them, and visalign "
            f"supports TI2V-5B (one transformer) or A14B (two experts without expand_timesteps). Set "
            f"pipe.transformer_2 = None and pipe.register_to_config(boundary_ratio=None) for TI2V-5B."
        )


@register_adapter
class Wan22TI2VPolicy(WanT2VPolicy):
    """Wan 2.2 TI2V-5B text-to-video (``WanPipeline`` with ``expand_timesteps``): per-token timesteps."""

    family = "wan22-ti2v"
    pipeline_class_names = ("WanPipeline",)
    wan_variant = "ti2v"

    def _validate_pipeline(self):
        super()._validate_pipeline()
        _refuse_ti2v_with_experts(self.pipe)

    def forward(self, latents, timesteps, kwargs, shared):
        timestep = _token_timesteps(timesteps, latents, self.denoiser.config.patch_size, clean_first=False)
        return self.run_denoiser(
            hidden_states=latents.to(self.dtype), timestep=timestep, return_dict=False, **kwargs, **shared
        )[0]


@register_adapter
class Wan22TI2VI2VPolicy(_WanPolicy):
    """Wan 2.2 TI2V-5B image-to-video (``WanImageToVideoPipeline`` with ``expand_timesteps``): a clean first frame."""

    family = "wan22-ti2v-i2v"
    pipeline_class_names = ("WanImageToVideoPipeline",)
    wan_variant = "ti2v"
    needs_image = True

    def _validate_pipeline(self):
        super()._validate_pipeline()
        _refuse_ti2v_with_experts(self.pipe)

    def _latent_channels(self) -> int:
        return self.vae.config.z_dim

    def encode_prompt(
        self, prompts, negative_prompts=None, guidance_scale=None, images=None, geometry=None, **kwargs
    ) -> Conditioning:
        if images is None:
            raise InvalidInputError(
                f"{self.family} needs a first frame per prompt: pass images=Tensor(B, 3, H, W) in [0, 1]."
            )
        geometry = geometry or self.default_geometry()
        conditioning = super().encode_prompt(prompts, negative_prompts, guidance_scale, **kwargs)
        first = {"first_frame": self.first_frame_latent(images, geometry)}
        conditioning.cond.update(first)
        if conditioning.uncond is not None:
            conditioning.uncond.update(first)  # stock gives both branches the image
        return conditioning

    def first_frame_latent(self, images: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """The normalised VAE latent (B, C, 1, h, w) of each first frame (the distribution's mode, as stock)."""
        pixels = self.pipe.video_processor.preprocess(images.float(), height=geometry.height, width=geometry.width)
        pixels = pixels.to(device=self.vae.device, dtype=torch.float32).unsqueeze(2)  # [-1, 1], one frame
        latent = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode()
        return self.normalize_latents(latent).to(self.device)

    def forward(self, latents, timesteps, kwargs, shared):
        kwargs = dict(kwargs)
        first = kwargs.pop("first_frame").float()
        hidden = torch.cat([first, latents[:, :, 1:].float()], dim=2).to(self.dtype)
        timestep = _token_timesteps(timesteps, latents, self.denoiser.config.patch_size, clean_first=True)
        out = self.run_denoiser(hidden_states=hidden, timestep=timestep, return_dict=False, **kwargs, **shared)[0]
        # The first frame is known: its velocity is the one that carries the state to it, (x − c)/σ.
        sigma = timesteps.float().reshape(-1, 1, 1, 1, 1) / self.pipe.scheduler.config.num_train_timesteps
        to_first = (latents[:, :, :1].float() - first) / sigma
        return torch.cat([to_first, out[:, :, 1:].float()], dim=2)
