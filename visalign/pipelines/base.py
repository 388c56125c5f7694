"""The :class:`Policy`: a diffusers pipeline wrapped for training and steering.

A Policy owns no math of its own. It hides what differs between model families (text encoding,
latent layout, CFG style, timestep conventions, VAE scaling, LoRA export) behind one small
interface, so that samplers, trainers and steering never branch on a family:

- :meth:`Policy.encode_prompt` → a :class:`Conditioning` (batched tensors, selectable by index);
- :meth:`Policy.prepare_latents` → the initial noise, in the layout the denoiser consumes;
- :meth:`Policy.schedule` → a :class:`Schedule` (σ table or ᾱ table, read from the scheduler);
- :meth:`Policy.predict` → the guided model output (velocity for flow, ε/v for DDPM);
- :meth:`Policy.decode` / :meth:`Policy.encode` → pixels in [0, 1] ↔ latents, differentiable;
- :meth:`Policy.add_lora`, :meth:`Policy.remove_lora`, :meth:`Policy.adapters_disabled`, :meth:`Policy.save_lora`,
  :meth:`Policy.load_lora`;
- :meth:`Policy.trainable_denoisers` / :meth:`Policy.training_module`: what training adapts. Most families
  have one denoiser; Wan 2.2 A14B has two experts, each running its own range of timesteps, and
  its ``training_module`` routes every row of a batch to its expert (:mod:`visalign.pipelines.wan22`);
- :meth:`Policy.enable_gradient_checkpointing`: activation recomputation on every trainable denoiser.

Family adapters subclass Policy in one file per family and register themselves by pipeline class.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from visalign.errors import ConfigError, InvalidInputError
from visalign.pipelines.datatypes import Conditioning, Geometry, Schedule, _cat_batched
from visalign.pipelines.lora import LoRAMethods

__all__ = ["Conditioning", "Geometry", "Policy", "Schedule"]


class Policy(LoRAMethods):
    """A diffusers pipeline wrapped so that visalign can sample, score and train it.

    Do not instantiate directly: use :func:`visalign.wrap` (a pipeline object) or
    :func:`visalign.load` (a hub id or local path); they pick the adapter for the pipeline class.

    Attributes:
        pipe: the wrapped diffusers pipeline. Its components are shared, not copied.
        family: the family name, e.g. ``"sd3"``.
        is_flow: True for rectified-flow models (velocity prediction), False for DDPM families.
        is_video: True when the output is a video ``(B, T, 3, H, W)``.
        needs_image: True when sampling needs a conditioning image (image-to-video).
    """

    family: ClassVar[str] = ""
    pipeline_class_names: ClassVar[tuple[str, ...]] = ()
    is_flow: ClassVar[bool] = True
    is_video: ClassVar[bool] = False
    needs_image: ClassVar[bool] = False
    # What the conditioning image is, for messages: an I2V "first frame" or an edit's "source image".
    image_role: ClassVar[str] = "first frame (image-to-video)"
    # Whether CFG batches [uncond, cond] in one forward (SD, SDXL, SD3 do, as stock does) or runs
    # two forwards (Wan, FLUX true-CFG, as stock does). Matching stock keeps outputs bit-comparable.
    cfg_batched: ClassVar[bool] = True
    # True when ``guidance_scale`` feeds a guidance embedding (FLUX.1-dev) rather than CFG.
    embedded_guidance: ClassVar[bool] = False
    # Name of the denoiser component on the pipeline, and of the LoRA keyword its saver takes.
    denoiser_name: ClassVar[str] = "transformer"
    # Modules LoRA targets by default (attention projections), per family.
    default_lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, pipe):
        self.pipe = pipe
        self._validate_pipeline()

    @classmethod
    def accepts(cls, pipe) -> bool:
        """Whether this adapter handles ``pipe``; consulted when several adapters share a pipeline class.

        Wan 2.1, Wan 2.2 A14B (two experts) and Wan 2.2 TI2V all load as ``WanPipeline``: each
        adapter accepts the variant it handles (:func:`visalign.pipelines.registry.adapter_for`).
        ``pipe`` may be any object, so read its attributes with ``getattr`` and a default.
        """
        return True

    # ------------------------------------------------------------------ components
    def _validate_pipeline(self) -> None:
        """Raises when a component this adapter needs is missing. Adapters extend it."""
        if getattr(self.pipe, self.denoiser_name, None) is None:
            raise InvalidInputError(
                f"The {type(self.pipe).__name__} has no '{self.denoiser_name}'; visalign needs the "
                f"denoiser to sample. Load the full pipeline."
            )

    @property
    def denoiser(self) -> torch.nn.Module:
        """The trainable network: the UNet or the transformer."""
        return getattr(self.pipe, self.denoiser_name)

    def trainable_denoisers(self) -> dict[str, torch.nn.Module]:
        """The networks training adapts, by pipeline attribute name: ``{denoiser_name: denoiser}``.

        Two-expert Wan 2.2 returns ``{"transformer": high-noise expert, "transformer_2": low-noise
        expert}``. :meth:`add_lora`, :meth:`save_lora`, :meth:`load_lora`, :meth:`adapters_disabled`
        and :meth:`merged_pipeline` act on every one of them.
        """
        return {self.denoiser_name: self.denoiser}

    def training_module(self) -> torch.nn.Module:
        """The one module a trainer makes trainable and hands to ``accelerator.prepare``.

        It is the denoiser itself for one-denoiser families. With several denoisers it is a module
        that holds all of them (so DDP/FSDP wrap them together and each forward is one call of one
        wrapped module) and routes each row of a batch to its denoiser; :meth:`run_denoiser` calls it.
        """
        return self.denoiser

    def enable_gradient_checkpointing(self) -> None:
        """Recomputes each trainable denoiser's block activations in backward instead of storing them.

        Calls diffusers' ``enable_gradient_checkpointing()`` on every module of
        :meth:`trainable_denoisers` (both Wan 2.2 experts), so that whatever :meth:`training_module`
        routes to is checkpointed. Outputs and gradients are unchanged; activation memory drops to
        about one block's worth at the cost of a second forward in backward. The trainer calls it
        when ``gradient_checkpointing`` is on.

        Raises:
            ConfigError: a trainable denoiser whose class does not support it; nothing is changed then.
        """
        denoisers = self.trainable_denoisers()
        # Check every module before touching any, so a refusal leaves the policy as it was.
        for name, module in denoisers.items():
            if not getattr(module, "_supports_gradient_checkpointing", False):
                raise ConfigError(
                    f"gradient_checkpointing is not supported for the {self.family} family: its {name} "
                    f"({type(module).__name__}) does not implement gradient checkpointing. Turn it off: "
                    f"gradient_checkpointing: false in the recipe (or gradient_checkpointing=false after "
                    f"`visalign train RECIPE`, or gradient_checkpointing=False in the config)."
                )
        for module in denoisers.values():
            module.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        """Stores activations again (undoes :meth:`enable_gradient_checkpointing`)."""
        for module in self.trainable_denoisers().values():
            if getattr(module, "_supports_gradient_checkpointing", False):
                module.disable_gradient_checkpointing()

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether every trainable denoiser has gradient checkpointing on."""
        return all(
            bool(getattr(module, "is_gradient_checkpointing", False)) for module in self.trainable_denoisers().values()
        )

    _runner: torch.nn.Module | None = None

    def run_denoiser(self, *args, **kwargs):
        """Calls the denoiser, through its distributed wrapper while a trainer has installed one.

        A trainer hands ``accelerator.prepare(policy.training_module())`` to :meth:`set_runner`, so
        that DDP/FSDP see every forward, while ``policy.denoiser`` stays the plain module (with its
        ``.config``) for everything else.
        """
        module = self._runner if self._runner is not None else self.training_module()
        return module(*args, **kwargs)

    def set_runner(self, module: torch.nn.Module | None) -> None:
        """Routes denoiser calls through ``module`` (a wrapper of :meth:`training_module`, e.g. DDP).

        None restores the plain one.
        """
        self._runner = module

    _scheduler_cache: tuple | None = None

    def sampling_scheduler(self, kind: type, build):
        """The pipeline's scheduler when it is a ``kind``, else ``build(scheduler)``, cached per scheduler.

        Each family samples with one scheduler class (flow-match Euler, DDIM). A checkpoint that ships
        another (Wan's UniPC, SD1.5's PNDM) is sampled with an equivalent one built from its config;
        the pipeline's own scheduler is left untouched, and a new one set on the pipe is picked up.
        """
        scheduler = self.pipe.scheduler
        if isinstance(scheduler, kind):
            return scheduler
        if self._scheduler_cache is None or self._scheduler_cache[0] is not scheduler:
            self._scheduler_cache = (scheduler, build(scheduler))
        return self._scheduler_cache[1]

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vae

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    def to(self, *args, **kwargs) -> Policy:
        self.pipe.to(*args, **kwargs)
        return self

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.denoiser.parameters())
        return (
            f"{type(self).__name__}(family={self.family!r}, pipeline={type(self.pipe).__name__}, denoiser_params={n:,})"
        )

    # ------------------------------------------------------------------ geometry
    @property
    def spatial_multiple(self) -> int:
        """Height and width must be multiples of this (VAE factor × patch size)."""
        raise NotImplementedError

    def default_geometry(self) -> Geometry:
        raise NotImplementedError

    def geometry(self, height=None, width=None, num_frames=None) -> Geometry:
        """Fills defaults and validates a requested size."""
        default = self.default_geometry()
        height = default.height if height is None else int(height)
        width = default.width if width is None else int(width)
        m = self.spatial_multiple
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % m:
                near = max(m, round(value / m) * m)
                raise InvalidInputError(
                    f"{name}={value} is not a positive multiple of {m}, which {self.family} needs "
                    f"(VAE downsampling × patch size). Use {name}={near}."
                )
        if self.is_video:
            num_frames = default.num_frames if num_frames is None else int(num_frames)
            num_frames = self.validate_num_frames(num_frames)
        elif num_frames not in (None, 1):
            raise InvalidInputError(
                f"num_frames={num_frames} was given to the image family {self.family}; leave it as None."
            )
        else:
            num_frames = None
        return Geometry(height, width, num_frames)

    def validate_num_frames(self, num_frames: int) -> int:
        return num_frames

    # ------------------------------------------------------------------ abstract family hooks
    def encode_prompt(
        self,
        prompts: list[str],
        negative_prompts: list[str] | None = None,
        guidance_scale: float | None = None,
        images: torch.Tensor | None = None,
        geometry: Geometry | None = None,
        **kwargs,
    ) -> Conditioning:
        """Encodes a batch of prompts (and, for I2V, conditioning images) into a Conditioning."""
        raise NotImplementedError

    def noise_shape(self, batch_size: int, geometry: Geometry) -> tuple[int, ...]:
        """The shape the stock pipeline draws its initial noise in (before any packing)."""
        raise NotImplementedError

    def to_model_layout(self, latents: torch.Tensor) -> torch.Tensor:
        """Noise-shaped latents → the layout the denoiser consumes (identity except FLUX packing)."""
        return latents

    init_noise_sigma: float = 1.0

    def prepare_latents(self, batch_size: int, geometry: Geometry, generator=None) -> torch.Tensor:
        """Initial noise in the denoiser's layout, float32, drawn as the stock pipeline draws it."""
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(
            self.noise_shape(batch_size, geometry), generator=generator, device=self.device, dtype=torch.float32
        )
        return self.to_model_layout(noise) * self.init_noise_sigma

    def latent_shape(self, batch_size: int, geometry: Geometry) -> tuple[int, ...]:
        """The shape of a state in the denoiser's layout (what ``Trajectory.latents[:, i]`` holds)."""
        meta = torch.empty(self.noise_shape(batch_size, geometry), device="meta")
        return tuple(self.to_model_layout(meta).shape)

    def schedule(self, num_steps: int, geometry: Geometry) -> Schedule:
        raise NotImplementedError

    def forward(
        self, latents: torch.Tensor, timesteps: torch.Tensor, kwargs: dict[str, Any], shared: dict[str, Any]
    ) -> torch.Tensor:
        """One denoiser call for one branch. ``timesteps`` is (B,) in scheduler units."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """Latents → pixels in [0, 1], (B,3,H,W) or (B,T,3,H,W). Differentiable."""
        raise NotImplementedError

    def encode(self, pixels: torch.Tensor, generator=None, sample: bool = False) -> torch.Tensor:
        """Pixels in [0, 1] → latents in the denoiser's layout (scaled as the pipeline scales)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ training-time noise
    # What algorithms that noise clean samples themselves (DPO, DRaFT-LV, the forward-process
    # trainers) need from a family. Flow and DDPM families implement them (docs/math.md §0, §3).
    prediction_type: str = "velocity"
    # The noise-level draw that suits the parameterisation: "logit_normal" (flow) or "uniform" (DDPM).
    default_level_sampling: ClassVar[str] = "logit_normal"

    def training_noise_levels(self, u: torch.Tensor, geometry: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps draws ``u`` ∈ (0, 1) to training noise levels; returns ``(level, timesteps)``.

        ``level`` is σ (flow: through the scheduler's shift, as sampling sees it) or ᾱ_t (DDPM:
        t = ⌊u·T⌋); ``timesteps`` are in the denoiser's scheduler units.
        """
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, level) -> torch.Tensor:
        """The forward process at ``level`` (σ for flow, ᾱ_t for DDPM), in float32."""
        raise NotImplementedError

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, level) -> torch.Tensor:
        """What the denoiser regresses on at ``level``: the velocity (flow), or ε / v / x0 (DDPM)."""
        raise NotImplementedError

    def vae_fingerprint(self) -> str:
        """A short hash of the VAE's config and first weights: keys caches of encoded latents."""
        import hashlib
        import json

        vae = self.vae
        first = next(vae.parameters()).detach().flatten()[:256].float().cpu().numpy().tobytes()
        config = json.dumps(dict(vae.config), sort_keys=True, default=str).encode()
        return hashlib.sha1(config + first).hexdigest()[:16]

    def use_batched_cfg(self) -> None:
        """Runs CFG as one batched [uncond, cond] forward from now on.

        Distributed training needs it: DDP expects one forward per backward, and two CFG forwards
        would break that. Outputs equal the two-forward form up to float rounding.
        """
        self.cfg_batched = True

    def merged_pipeline(self):
        """A copy of the pipeline whose denoiser has the LoRA merged into its weights (no adapter left)."""
        import copy

        pipe = copy.deepcopy(self.pipe)
        for name in self.trainable_denoisers():
            denoiser = getattr(pipe, name)
            if getattr(denoiser, "peft_config", None):
                denoiser.fuse_lora()
                denoiser.unload_lora()
        return pipe

    # ------------------------------------------------------------------ shared behaviour
    def predict(
        self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning, detach_uncond: bool = False
    ) -> torch.Tensor:
        """The guided model output for a batch of states, in float32.

        Args:
            latents: (B, ...) states in the denoiser's layout.
            timesteps: (B,) or scalar, in scheduler units (``Schedule.timesteps`` entries).
            conditioning: from :meth:`encode_prompt`, with the same batch size.
            detach_uncond: run the unconditional branch without gradient (Flow-GRPO's choice);
                otherwise gradients flow through both branches (DanceGRPO's).

        Returns:
            The velocity (flow) or the model's ε / v / x0 output (DDPM), float32, shape of ``latents``.
        """
        timesteps = torch.as_tensor(timesteps, device=latents.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(latents.shape[0])
        if not conditioning.do_cfg:
            return self.forward(latents, timesteps, conditioning.cond, conditioning.shared).float()
        scale = self.guidance_scale_at(timesteps, conditioning)
        if isinstance(scale, torch.Tensor):
            scale = scale.view(-1, *([1] * (latents.ndim - 1)))
        uncond, cond = self._cfg_branches(latents, timesteps, conditioning, detach_uncond)
        return self.combine_guidance(uncond, cond, scale)

    def _cfg_branches(self, latents, timesteps, conditioning: Conditioning, detach_uncond: bool):
        """The unconditional and conditional outputs, float32: one batched forward or two, as stock does."""
        if detach_uncond:
            with torch.no_grad():
                uncond = self.forward(latents, timesteps, conditioning.uncond, conditioning.shared).float()
            cond = self.forward(latents, timesteps, conditioning.cond, conditioning.shared).float()
        elif self.cfg_batched:
            both = _cat_batched([conditioning.uncond, conditioning.cond])
            out = self.forward(
                torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), both, conditioning.shared
            ).float()
            uncond, cond = out.chunk(2)
        else:
            cond = self.forward(latents, timesteps, conditioning.cond, conditioning.shared).float()
            uncond = self.forward(latents, timesteps, conditioning.uncond, conditioning.shared).float()
        return uncond, cond

    def combine_guidance(self, uncond: torch.Tensor, cond: torch.Tensor, scale) -> torch.Tensor:
        """CFG, u + s·(c − u); a family whose stock pipeline post-processes it overrides this (Qwen-Image)."""
        return uncond + scale * (cond - uncond)

    def guidance_scale_at(self, timesteps: torch.Tensor, conditioning: Conditioning) -> float | torch.Tensor:
        """The CFG scale at ``timesteps`` (B,): a float, or a (B,) tensor when it differs between rows.

        ``conditioning.guidance_scale`` for every family but two-expert Wan 2.2, whose low-noise
        expert has its own ``guidance_scale_2``.
        """
        return conditioning.guidance_scale

    # ------------------------------------------------------------------ helpers for adapters
    def _pipeline_name(self) -> str:
        return type(self.pipe).__name__
