"""The reward interface and the one way trainers call a reward (input checks: :mod:`.checks`).

A reward maps decoded pixels and their prompts to one number per sample::

    scores = reward(images, prompts)        # images: float [0, 1], (B, 3, H, W) or (B, T, 3, H, W)
    scores.shape == (B,); scores.dtype == torch.float32; scores.device == images.device

Two kinds of object are rewards:

- a :class:`Reward` subclass (``CLIPScore``, ``Aesthetic``, ...): an ``nn.Module`` holding frozen
  weights, which validates its input, places itself on the images' device, scores in chunks of
  ``batch_size`` and refuses backprop when it is not differentiable;
- any plain callable ``fn(images, prompts, **conditioning) -> Tensor[B]``.

Trainers, steering and the CLI never call either directly: they go through :func:`call_reward`,
the one internal call path. It accepts both, drops conditioning a reward does not take, checks the
output (shape ``[B]``, finite) so that a broken reward raises :class:`~visalign.errors.RewardError`
at once instead of a NaN loss later, and returns a :class:`~visalign.rewards.RewardResult`: the
total with the reward's named parts (:meth:`Reward.evaluate`), e.g. each member of a
:class:`~visalign.rewards.Combined`.

Non-differentiable rewards. When ``differentiable`` is ``False`` the scores are computed under
``torch.no_grad()``. If the images require grad, the scores are still attached to the graph through
a node whose backward raises :class:`~visalign.errors.NotDifferentiableError`: the forward pass (for
logging, or as GRPO advantages after ``.detach()``) works, and only an actual backward through the
reward fails, with a message naming the reward. If the images do not require grad, the scores are
a plain constant tensor.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from visalign.errors import InvalidInputError, NotDifferentiableError
from visalign.rewards.checks import check_images, check_prompts, check_scores
from visalign.rewards.result import RewardResult

__all__ = [
    "Reward",
    "FunctionReward",
    "as_reward",
    "call_reward",
    "reward_name",
    "is_differentiable",
    "freeze",
]


# ----------------------------------------------------------------------------- helpers
def freeze(module: nn.Module) -> nn.Module:
    """Puts ``module`` in eval mode and turns off ``requires_grad`` on all its parameters."""
    module.eval()
    module.requires_grad_(False)
    return module


def _accepted_kwargs(fn: Callable) -> set[str] | None:
    """Names of keyword arguments ``fn`` takes after (images, prompts); None means any."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    skip = {p.name for p in positional[:2]}
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in skip}


def _slice_conditioning(conditioning: Mapping[str, Any], batch: int, start: int, stop: int) -> dict[str, Any]:
    """Slices per-sample conditioning (tensors with first dim ``batch``, lists of ``batch``)."""
    out = {}
    for key, value in conditioning.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            out[key] = value[start:stop]
        elif isinstance(value, (list, tuple)) and len(value) == batch:
            out[key] = value[start:stop]
        else:
            out[key] = value
    return out


class _RefuseBackward(torch.autograd.Function):
    """Identity on the scores; its backward raises NotDifferentiableError."""

    @staticmethod
    def forward(ctx, scores, images, name):  # noqa: D401 - autograd API
        ctx.reward_name = name
        return scores.clone()

    @staticmethod
    def backward(ctx, grad):
        raise NotDifferentiableError(
            f"reward '{ctx.reward_name}' is not differentiable (differentiable=False), so no "
            "gradient flows from its scores to the images. Detach the scores (e.g. to use them "
            "as GRPO/DPO advantages), or use a differentiable reward for DRaFT and reward "
            "guidance."
        )


# ----------------------------------------------------------------------------- Reward
class Reward(nn.Module):
    """Base class of visalign's rewards: ``reward(images, prompts, **conditioning) -> Tensor[B]``.

    Subclasses implement :meth:`score` for one chunk of already-validated input (or
    :meth:`score_parts`, when the score is a weighted sum of named parts). The base class validates
    the input, moves the reward to the images' device on first use, splits the batch into chunks
    of ``batch_size``, returns float32 scores on the images' device, and enforces
    ``differentiable`` (see the module docstring). Calling the reward returns the scores;
    :meth:`evaluate` returns them with their parts, as a :class:`RewardResult`.

    The weights of every model a reward holds are frozen (``requires_grad=False``) and stay in eval
    mode: ``reward.train()`` does not turn dropout back on.

    Class attributes a subclass may set:
        input_kind: ``"image"`` (B, 3, H, W), ``"video"`` (B, T, 3, H, W) or ``"any"``.
        needs_prompts: whether ``prompts`` may be ``None``.

    Args:
        name: a short name for logs; defaults to the class's ``default_name``.
        differentiable: whether gradients flow from the scores to the pixels;
            defaults to the class's ``default_differentiable``.
        batch_size: the most samples scored at once; ``None`` scores the whole
            batch together.
        check_range: check that pixel values lie in [0, 1] (default True).
    """

    default_name: str = "reward"
    default_differentiable: bool = True
    input_kind: str = "image"
    needs_prompts: bool = True

    def __init__(
        self,
        *,
        name: str | None = None,
        differentiable: bool | None = None,
        batch_size: int | None = None,
        check_range: bool = True,
    ):
        super().__init__()
        self.name = name or self.default_name
        self.differentiable = self.default_differentiable if differentiable is None else bool(differentiable)
        if batch_size is not None and int(batch_size) < 1:
            raise InvalidInputError(f"{self.name}: batch_size must be >= 1 or None; got {batch_size}.")
        self.batch_size = None if batch_size is None else int(batch_size)
        self.check_range = check_range
        self._placed_on: torch.device | None = None

    # -- to implement ------------------------------------------------------------------------
    def score(self, images: torch.Tensor, prompts: list[str] | None, **conditioning) -> torch.Tensor:
        """Scores one chunk of validated input; returns a tensor of shape (chunk,)."""
        raise NotImplementedError

    def score_parts(self, images: torch.Tensor, prompts: list[str] | None, **conditioning) -> RewardResult:
        """Scores one chunk with its named parts. The default has no parts: it wraps :meth:`score`.

        A reward whose score is a weighted sum of natural parts (:class:`~visalign.rewards.Combined`,
        :class:`~visalign.rewards.MultiHeadVideoReward`) overrides this instead.
        """
        return RewardResult(self.score(images, prompts, **conditioning))

    # -- machinery ---------------------------------------------------------------------------
    def train(self, mode: bool = True):
        """Records the mode but keeps every wrapped model in eval mode (rewards are frozen)."""
        self.training = mode
        return self

    @property
    def accepted_conditioning(self) -> set[str] | None:
        """The conditioning keywords :meth:`score` takes; ``None`` means any."""
        return _accepted_kwargs(self.score)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the reward's floating-point weights (float32 when it has none)."""
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def place(self, device: torch.device) -> None:
        """Moves the reward's weights to ``device`` (once; later calls on that device are free)."""
        device = torch.device(device)
        if self._placed_on != device:
            self.to(device)
            self._placed_on = device

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None = None, **conditioning) -> torch.Tensor:
        """Scores a batch.

        Args:
            images: floats in [0, 1], (B, 3, H, W) for image rewards or
                (B, T, 3, H, W) for video rewards.
            prompts: one prompt per sample (may be ``None`` for rewards that ignore
                prompts, like ``Aesthetic``).
            **conditioning: extra per-sample inputs the reward takes (e.g. ``reference_images``).

        Returns:
            `torch.Tensor`: float32 scores of shape (B,) on ``images.device``.
        """
        return self.evaluate(images, prompts, **conditioning).total

    def evaluate(self, images: torch.Tensor, prompts: Sequence[str] | None = None, **conditioning) -> RewardResult:
        """Scores a batch like calling the reward, and returns the scores with their named parts.

        Takes the arguments of :meth:`forward`. Returns a :class:`RewardResult` whose ``total`` is
        what calling the reward returns; ``components``, ``raw`` and ``weights`` are empty for a
        reward without parts. When the reward is not differentiable, only ``total`` is attached
        to the graph (to refuse a backward); the parts are constants.
        """
        images = check_images(images, self.input_kind, name=self.name, check_range=self.check_range)
        batch = images.shape[0]
        prompts = check_prompts(prompts, batch, name=self.name, required=self.needs_prompts)
        accepted = self.accepted_conditioning
        if accepted is not None:
            unknown = sorted(set(conditioning) - accepted)
            if unknown:
                raise InvalidInputError(
                    f"{self.name}: unexpected conditioning {unknown}; this reward takes {sorted(accepted) or 'none'}."
                )
        self.place(images.device)
        if self.differentiable:
            result = self._chunked(images, prompts, conditioning)
        else:
            with torch.no_grad():
                result = self._chunked(images.detach(), prompts, conditioning)
            if images.requires_grad and torch.is_grad_enabled():
                result.total = _RefuseBackward.apply(result.total.float(), images, self.name)
        result.total = check_scores(result.total, batch, images.device, name=self.name)
        return result

    def _chunked(self, images, prompts, conditioning) -> RewardResult:
        batch = images.shape[0]
        step = self.batch_size or batch
        if step >= batch:
            return self.score_parts(images, prompts, **conditioning).float()
        outs = []
        for start in range(0, batch, step):
            stop = min(start + step, batch)
            chunk_prompts = None if prompts is None else prompts[start:stop]
            chunk_cond = _slice_conditioning(conditioning, batch, start, stop)
            outs.append(self.score_parts(images[start:stop], chunk_prompts, **chunk_cond).float())
        return RewardResult.cat(outs)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, differentiable={self.differentiable}, batch_size={self.batch_size}"


class FunctionReward(Reward):
    """A plain callable ``fn(images, prompts, **conditioning) -> Tensor[B]`` as a :class:`Reward`.

    Args:
        fn: the function.
        name: defaults to ``fn.name`` or ``fn.__name__``.
        differentiable: defaults to ``fn.differentiable`` when present, else
            ``True`` (a torch function of the pixels is differentiable unless it says otherwise).
        input_kind: which pixel ranks to accept (default "any").
    """

    input_kind = "any"

    def __init__(
        self,
        fn: Callable,
        *,
        name: str | None = None,
        differentiable: bool | None = None,
        input_kind: str = "any",
        needs_prompts: bool = False,
        batch_size: int | None = None,
    ):
        if not callable(fn):
            raise InvalidInputError(f"a reward must be callable; got {type(fn).__name__}.")
        if differentiable is None:
            differentiable = getattr(fn, "differentiable", True)
        super().__init__(name=name or reward_name(fn), differentiable=differentiable, batch_size=batch_size)
        self.fn = fn
        self.input_kind = input_kind
        self.needs_prompts = needs_prompts

    @property
    def accepted_conditioning(self) -> set[str] | None:
        return _accepted_kwargs(self.fn)

    def score(self, images, prompts, **conditioning):
        out = self.fn(images, prompts, **conditioning)
        return check_scores(out, images.shape[0], images.device, name=self.name)


# ----------------------------------------------------------------------------- helpers
def reward_name(reward: Any) -> str:
    """A reward's ``name``, or a plain callable's ``__name__`` (or its class name)."""
    name = getattr(reward, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(reward, "__name__", None) or type(reward).__name__


def is_differentiable(reward: Any) -> bool:
    """``reward.differentiable`` when it has one; plain callables count as differentiable."""
    return bool(getattr(reward, "differentiable", True))


def as_reward(reward: Any, *, name: str | None = None, differentiable: bool | None = None) -> Reward:
    """Returns ``reward`` itself if it is a :class:`Reward`, else wraps the callable in
    :class:`FunctionReward`.
    """
    if isinstance(reward, Reward) and name is None and differentiable is None:
        return reward
    if isinstance(reward, Reward):
        if name is not None:
            reward.name = name
        if differentiable is not None:
            reward.differentiable = bool(differentiable)
        return reward
    return FunctionReward(reward, name=name, differentiable=differentiable)


def call_reward(reward: Any, images: torch.Tensor, prompts: Sequence[str] | None, **conditioning) -> RewardResult:
    """Scores a batch with a :class:`Reward` or a plain callable: visalign's one internal call path.

    Trainers, steering and the CLI call every reward through here. Conditioning keywords the
    reward's signature does not take are dropped (a trainer passes what it has; each reward takes
    what it needs). The images are validated (rank 4 or 5, three channels, [0, 1]) and so is the
    total (shape ``[B]``, finite). A :class:`Reward` is scored with :meth:`Reward.evaluate`, so
    the result carries its named parts (a :class:`~visalign.rewards.Combined`'s members); a plain
    callable's tensor becomes a result without parts.

    Args:
        reward: a :class:`Reward` or a callable ``(images, prompts, **conditioning) -> Tensor[B]``.
        images: floats in [0, 1], (B, 3, H, W) or (B, T, 3, H, W).
        prompts: one per sample.
        **conditioning: optional per-sample extras, e.g. ``reference_images``.

    Returns:
        :class:`RewardResult`: ``total`` is float32 (B,) on ``images.device``; use ``.total``
        where only the scores are needed.

    Raises:
        InvalidInputError: bad images or prompts.
        RewardError: the reward returned something other than B finite numbers.
    """
    if not callable(reward):
        raise InvalidInputError(
            f"a reward must be a visalign Reward or a callable (images, prompts) -> Tensor[B]; "
            f"got {type(reward).__name__}."
        )
    name = reward_name(reward)
    accepted = reward.accepted_conditioning if isinstance(reward, Reward) else _accepted_kwargs(reward)
    if accepted is not None:
        conditioning = {k: v for k, v in conditioning.items() if k in accepted}
    if isinstance(reward, Reward):
        result = reward.evaluate(images, prompts, **conditioning)
    else:
        images = check_images(images, "any", name=name)
        if prompts is not None:
            prompts = check_prompts(prompts, images.shape[0], name=name)
        result = RewardResult(reward(images, prompts, **conditioning))
    result.total = check_scores(result.total, _batch(images), images.device, name=name)
    return result


def _batch(images: Any) -> int:
    return images.shape[0] if isinstance(images, torch.Tensor) and images.dim() > 0 else 0
