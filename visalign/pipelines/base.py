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
  its ``training_module`` routes every row of a batch to its expert (:mod:`visalign.pipelines.wan22`).

Family adapters subclass Policy in one file per family and register themselves by pipeline class.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from visalign.errors import ConfigError, InvalidInputError
from visalign.pipelines.datatypes import Conditioning, Geometry, Schedule, _cat_batched

__all__ = ["Conditioning", "Geometry", "Policy", "Schedule"]


class Policy:
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
        return uncond + scale * (cond - uncond)

    def guidance_scale_at(self, timesteps: torch.Tensor, conditioning: Conditioning) -> float | torch.Tensor:
        """The CFG scale at ``timesteps`` (B,): a float, or a (B,) tensor when it differs between rows.

        ``conditioning.guidance_scale`` for every family but two-expert Wan 2.2, whose low-noise
        expert has its own ``guidance_scale_2``.
        """
        return conditioning.guidance_scale

    # ------------------------------------------------------------------ LoRA
    def add_lora(
        self,
        rank: int = 8,
        alpha: float | None = None,
        target_modules: Sequence[str] | None = None,
        dropout: float = 0.0,
        adapter_name: str = "default",
        init_lora_weights=True,
    ) -> None:
        """Attaches a peft LoRA adapter to every trainable denoiser; only its weights stay trainable.

        Args:
            rank: the LoRA rank r.
            alpha: the LoRA alpha (scale alpha/r); defaults to ``rank``.
            target_modules: module names to adapt; defaults to the family's attention projections.
            dropout: LoRA dropout.
            adapter_name: the peft adapter name.
            init_lora_weights: peft's init (True: B = 0, so the policy starts equal to the base).
        """
        from peft import LoraConfig

        if rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {rank}.")
        config = LoraConfig(
            r=rank,
            lora_alpha=rank if alpha is None else alpha,
            target_modules=list(target_modules or self.default_lora_targets),
            lora_dropout=dropout,
            init_lora_weights=init_lora_weights,
        )
        if any(adapter_name in (getattr(d, "peft_config", None) or {}) for d in self.trainable_denoisers().values()):
            # E.g. a notebook cell that builds a trainer run twice on the same policy.
            import warnings

            self.remove_lora(adapter_name)
            warnings.warn(
                f"The policy already had a LoRA adapter {adapter_name!r}; it was replaced by a fresh one "
                f"(the previous adapter's trained weights are gone from this policy). To keep training the "
                f"previous adapter, keep using the trainer that created it (trainer.train() again, or "
                f"resume='latest' from its output_dir), or save it first with policy.save_lora(folder); "
                f"to start over without this warning, call policy.remove_lora() before building a new trainer "
                f"or load a fresh policy.",
                UserWarning,
                stacklevel=2,
            )
        for denoiser in self.trainable_denoisers().values():
            denoiser.requires_grad_(False)
            denoiser.add_adapter(config, adapter_name=adapter_name)
            denoiser.set_adapter(adapter_name)

    def remove_lora(self, adapter_name: str = "default") -> None:
        """Removes a LoRA adapter from the denoisers; without adapters they are the base model again.

        The last adapter is unloaded entirely (the original layers are restored); with several,
        only ``adapter_name`` is deleted and the remaining ones stay active.
        """
        holders = {
            n: d
            for n, d in self.trainable_denoisers().items()
            if adapter_name in (getattr(d, "peft_config", None) or {})
        }
        if not holders:
            names = sorted(
                {name for d in self.trainable_denoisers().values() for name in (getattr(d, "peft_config", None) or {})}
            )
            raise ConfigError(
                f"remove_lora({adapter_name!r}): the policy has no adapter of that name "
                f"(adapters: {names or 'none'}). Call policy.add_lora() to attach one."
            )
        for denoiser in holders.values():
            names = list(denoiser.peft_config)
            if names == [adapter_name]:
                denoiser.unload_lora()
            else:
                denoiser.delete_adapters(adapter_name)
                denoiser.set_adapter([n for n in names if n != adapter_name])

    @property
    def has_lora(self) -> bool:
        return any(getattr(d, "peft_config", None) for d in self.trainable_denoisers().values())

    @contextlib.contextmanager
    def adapters_disabled(self):
        """Within this block the denoisers run as the base model (the LoRA reference policy)."""
        if not self.has_lora:
            raise ConfigError(
                "adapters_disabled() needs a LoRA adapter; call policy.add_lora() first, or keep a "
                "frozen copy of the model as the reference for full fine-tuning."
            )
        adapted = [d for d in self.trainable_denoisers().values() if getattr(d, "peft_config", None)]
        for denoiser in adapted:
            denoiser.disable_adapters()
        try:
            yield
        finally:
            for denoiser in adapted:
                denoiser.enable_adapters()

    def lora_state_dict(self, adapter_name: str = "default", denoiser: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's weights of one denoiser (default: :attr:`denoiser_name`).

        The keys are those the pipeline's ``save_lora_weights`` expects.
        """
        from peft.utils import get_peft_model_state_dict

        module = self.trainable_denoisers()[denoiser or self.denoiser_name]
        return get_peft_model_state_dict(module, adapter_name=adapter_name)

    def _require_lora_on_every_denoiser(self, adapter_name: str, action: str) -> None:
        """A clear error when some trainable denoiser lacks the adapter (e.g. a LoRA for one expert only)."""
        if not self.has_lora:
            raise ConfigError(f"{action} needs a LoRA adapter; call policy.add_lora() first.")
        missing = [
            n
            for n, d in self.trainable_denoisers().items()
            if adapter_name not in (getattr(d, "peft_config", None) or {})
        ]
        if missing:
            have = [n for n in self.trainable_denoisers() if n not in missing]
            raise ConfigError(
                f"{action}: {self.family} trains {', '.join(self.trainable_denoisers())}, but only "
                f"{', '.join(have)} has a LoRA adapter {adapter_name!r} ({', '.join(missing)} has none), so the "
                f"export would give one LoRA for a single {self._denoiser_kind} where all are needed. Attach the "
                f"adapter to every one with policy.add_lora(...) (or load a LoRA for each with policy.load_lora)."
            )

    _denoiser_kind: ClassVar[str] = "denoiser"

    def save_lora(self, save_directory: str, adapter_name: str = "default") -> None:
        """Saves the LoRA in diffusers format; ``pipe.load_lora_weights(save_directory)`` reads it.

        The adapter config (rank, alpha, targets) goes into the file's metadata, so that the loaded
        LoRA has the trained scale even when alpha ≠ rank. Families with several denoisers write one
        file per denoiser (see their adapter's docstring for the lines that load them);
        :meth:`load_lora` loads whatever this writes.
        """
        self._require_lora_on_every_denoiser(adapter_name, "save_lora()")
        for name, denoiser in self.trainable_denoisers().items():
            state = {k: v.detach().cpu().contiguous() for k, v in self.lora_state_dict(adapter_name, name).items()}
            self._write_lora(save_directory, name, state, denoiser.peft_config[adapter_name].to_dict())

    def _write_lora(self, save_directory: str, name: str, state: dict, metadata: dict) -> None:
        """Writes one denoiser's LoRA: the pipeline's ``save_lora_weights`` under ``{name}_lora_layers``."""
        type(self.pipe).save_lora_weights(
            save_directory,
            **{f"{name}_lora_layers": state, f"{name}_lora_adapter_metadata": metadata},
            safe_serialization=True,
        )

    def load_lora(self, path: str, adapter_name: str | None = None) -> None:
        """Loads a LoRA written by :meth:`save_lora` (or any diffusers LoRA) into the pipeline.

        ``pipe.load_lora_weights(path)`` for most families; the families with several denoisers or
        without a pipeline LoRA loader override it (Wan 2.2 loads both experts, HunyuanVideo 1.5
        loads through its transformer). Loaded adapters are for sampling: to train further, keep the
        trainer that made them.
        """
        self.pipe.load_lora_weights(path, adapter_name=adapter_name)

    # ------------------------------------------------------------------ helpers for adapters
    def _pipeline_name(self) -> str:
        return type(self.pipe).__name__
