"""UnifiedReward-style judges: a VLM writes a verdict, a parser turns it into a score.

UnifiedReward (Wang et al., arXiv 2503.05236; Qwen2.5-VL / Qwen3-VL judges, MIT) is prompted with
the caption and the image (or two images) and answers in text; the score is read from the text:

- ``mode="pointwise"`` (v1): "... Final Score: 4" → ``x / 5`` (x in 1..5);
- ``mode="pointwise_v2"`` (v2.0): "Alignment Score (1-5): a", "Coherence Score (1-5): b",
  "Style Score (1-5): c" → ``(mean(a, b, c) − 1) / 4``, with the three as named parts;
- ``mode="pairwise"``: the generated image and a reference (``reference_images=``) →
  "Image 1 is better." / "Image 2 is better." / "Both images are equally good." → 1 / 0 / 0.5
  for the generated image (``both_orders=True`` also asks with the two swapped and averages).

The judge runs either locally (any transformers image-text-to-text model and its processor,
greedy ``generate``) or behind an OpenAI-compatible chat endpoint (vLLM, SGLang, ...:
``base_url=``, the served ``model`` name, the key from an environment variable), the images sent
losslessly as base64 PNG data URLs. Only the standard library talks to the endpoint.

**An answer that cannot be parsed** raises :class:`UnparseableAnswerError` (a
:class:`~visalign.errors.RewardError`, so a trainer skips the step instead of dying), quoting the
answer and the form expected: a judge that ignores the format is usually misconfigured (another
template, another model, too few new tokens), and scoring it 0 would train the policy on noise.
``on_unparseable="zero"`` instead scores such a sample 0 with a logged warning, as Flow-GRPO does;
``reward.unparseable`` counts them.

The templates here are written for visalign, in the spirit of UnifiedReward's; the released judges
were trained on their repository's exact wording, which ``template=`` accepts (``{prompt}`` is
replaced by the caption).

The parts live next door, and their names are importable from here too: the templates and the
parsers in :mod:`visalign.rewards.unified_text`, :class:`LocalVLMJudge` in
:mod:`visalign.rewards.unified_local`, :class:`ChatEndpointJudge` (and :func:`image_data_url`) in
:mod:`visalign.rewards.unified_endpoint`. This module holds the reward.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from visalign.errors import ConfigError, InvalidInputError, RewardError
from visalign.rewards.base import Reward
from visalign.rewards.checks import check_images
from visalign.rewards.result import RewardResult
from visalign.rewards.unified_endpoint import JUDGE_API_KEY_ENV, ChatEndpointJudge, image_data_url
from visalign.rewards.unified_local import LocalVLMJudge
from visalign.rewards.unified_text import (
    EXPECTED_ANSWERS,
    MODES,
    PAIRWISE_TEMPLATE,
    POINTWISE_TEMPLATE,
    POINTWISE_V2_TEMPLATE,
    TEMPLATES,
    V2_PARTS,
    UnparseableAnswerError,
    parse_pairwise,
    parse_pointwise,
    parse_pointwise_v2,
)

__all__ = [
    "UnifiedReward",
    "UnparseableAnswerError",
    "LocalVLMJudge",
    "ChatEndpointJudge",
    "POINTWISE_TEMPLATE",
    "POINTWISE_V2_TEMPLATE",
    "PAIRWISE_TEMPLATE",
    "MODES",
    "parse_pointwise",
    "parse_pointwise_v2",
    "parse_pairwise",
    "image_data_url",
    "JUDGE_API_KEY_ENV",
]

logger = logging.getLogger(__name__)


class UnifiedReward(Reward):
    """A VLM judge's verdict as a reward (UnifiedReward's pointwise and pairwise protocols).

    Give either a local model (``model`` a hub id / folder / built image-text-to-text model, with
    ``processor``) or an endpoint (``base_url`` plus the served ``model`` name); see the module
    docstring for the modes, the score mappings and unparseable answers.

    Args:
        model: the local judge, or the served model name when ``base_url`` is given.
        processor: the local judge's processor.
        base_url: an OpenAI-compatible API root (``http://HOST:PORT/v1``); selects the endpoint route.
        mode: ``"pointwise"`` (v1, default), ``"pointwise_v2"`` or ``"pairwise"``.
        template: the instruction, with ``{prompt}``; defaults to the mode's template.
        both_orders: pairwise only: also ask with the images swapped and average (cancels the
            judge's position bias; twice the requests).
        on_unparseable: ``"raise"`` (default) or ``"zero"``.
        judge: a ready :class:`LocalVLMJudge` / :class:`ChatEndpointJudge` (instead of the above).
        api_key, api_key_env, timeout, retries, backoff, max_concurrency, temperature, system_prompt,
            extra_body: for the endpoint (:class:`ChatEndpointJudge`).
        max_new_tokens: the answer's length limit (local default 256, endpoint 512 as ``max_tokens``).
        batch_size, torch_dtype, name: as for every :class:`Reward` (defaults 8, fp32, "unified_reward").

    Conditioning:
        reference_images: pairwise mode, (B, 3, H, W) in [0, 1], one reference per sample.
    """

    default_name = "unified_reward"
    default_differentiable = False

    def __init__(
        self,
        model: Any = None,
        processor: Any = None,
        *,
        base_url: str | None = None,
        mode: str = "pointwise",
        template: str | None = None,
        both_orders: bool = False,
        on_unparseable: str = "raise",
        judge: LocalVLMJudge | ChatEndpointJudge | None = None,
        api_key: str | None = None,
        api_key_env: str = JUDGE_API_KEY_ENV,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_concurrency: int = 8,
        temperature: float = 0.0,
        max_new_tokens: int | None = None,
        system_prompt: str | None = None,
        extra_body: dict | None = None,
        batch_size: int | None = 8,
        torch_dtype: torch.dtype | str | None = None,
        name: str | None = None,
    ):
        super().__init__(name=name, differentiable=False, batch_size=batch_size)
        if mode not in MODES:
            raise ConfigError(f"UnifiedReward mode must be one of {MODES}; got {mode!r}.")
        if on_unparseable not in ("raise", "zero"):
            raise ConfigError(f"on_unparseable must be 'raise' or 'zero'; got {on_unparseable!r}.")
        template = TEMPLATES[mode] if template is None else template
        if "{prompt}" not in template:
            raise ConfigError("template must contain '{prompt}' where the caption goes.")
        if both_orders and mode != "pairwise":
            raise ConfigError("both_orders=True is for mode='pairwise'.")
        if isinstance(torch_dtype, str):
            torch_dtype = getattr(torch, torch_dtype)
        if judge is None:
            if base_url is not None:
                judge = ChatEndpointJudge(
                    base_url,
                    model,
                    api_key=api_key,
                    api_key_env=api_key_env,
                    timeout=timeout,
                    retries=retries,
                    backoff=backoff,
                    max_tokens=max_new_tokens or 512,
                    temperature=temperature,
                    max_concurrency=max_concurrency,
                    system_prompt=system_prompt,
                    extra_body=extra_body,
                )
            elif model is not None:
                judge = LocalVLMJudge(
                    model,
                    processor,
                    max_new_tokens=max_new_tokens or 256,
                    system_prompt=system_prompt,
                    torch_dtype=torch_dtype,
                )
            else:
                raise ConfigError(
                    "UnifiedReward needs a judge: model= (a local VLM, with processor=) or base_url= and model= "
                    "(an OpenAI-compatible endpoint and the served model name)."
                )
        self.judge = judge
        self.mode, self.template, self.both_orders = mode, template, bool(both_orders)
        self.on_unparseable = on_unparseable
        self.unparseable = 0
        self.last_answers: list[str] = []

    # -- prompts and parsing -----------------------------------------------------------------
    def render(self, prompt: str) -> str:
        """The instruction sent with the image(s) for ``prompt``."""
        return self.template.replace("{prompt}", prompt)

    def parse(self, answer: str) -> float | dict[str, float]:
        """The mode's parse of one answer (raises :class:`UnparseableAnswerError`)."""
        if self.mode == "pointwise":
            return parse_pointwise(answer)
        if self.mode == "pointwise_v2":
            return parse_pointwise_v2(answer)
        return parse_pairwise(answer)

    def _read(self, answer: str) -> float | dict[str, float] | None:
        try:
            return self.parse(answer)
        except UnparseableAnswerError as exc:
            if self.on_unparseable == "raise":
                raise UnparseableAnswerError(f"{self.name}: {exc}") from None
            self.unparseable += 1
            shown = answer if len(answer) <= 200 else answer[:200] + " [...]"
            logger.warning(
                "%s: scoring 0 for an answer without %s (%d so far): %r",
                self.name,
                EXPECTED_ANSWERS[self.mode],
                self.unparseable,
                shown,
            )
            return None

    # -- scoring -----------------------------------------------------------------------------
    def score(self, images: torch.Tensor, prompts: list[str], reference_images: torch.Tensor | None = None):
        return self.score_parts(images, prompts, reference_images=reference_images).total

    def score_parts(
        self, images: torch.Tensor, prompts: list[str], reference_images: torch.Tensor | None = None
    ) -> RewardResult:
        batch, device = images.shape[0], images.device
        if self.mode == "pairwise":
            if reference_images is None:
                raise InvalidInputError(
                    f"{self.name}: pairwise mode needs reference_images=, a (B, 3, H, W) tensor in [0, 1] "
                    f"with B={batch}."
                )
            check_images(reference_images, "image", name=f"{self.name} reference_images")
            if reference_images.shape[0] != batch:
                raise InvalidInputError(
                    f"{self.name}: got {reference_images.shape[0]} reference images for {batch} images; "
                    "pass one per image."
                )
            requests = [([images[i], reference_images[i]], self.render(p)) for i, p in enumerate(prompts)]
            if self.both_orders:
                requests += [([reference_images[i], images[i]], self.render(p)) for i, p in enumerate(prompts)]
        elif reference_images is not None:
            raise InvalidInputError(f"{self.name}: reference_images is only used with mode='pairwise'.")
        else:
            requests = [([images[i]], self.render(p)) for i, p in enumerate(prompts)]
        answers = self.judge.generate(requests)
        if len(answers) != len(requests):
            raise RewardError(f"{self.name}: the judge returned {len(answers)} answers for {len(requests)} requests.")
        self.last_answers = list(answers)
        parsed = [self._read(a) for a in answers]

        def vec(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        if self.mode == "pointwise":
            return RewardResult(vec([0.0 if x is None else x / 5.0 for x in parsed]))
        if self.mode == "pairwise":
            first = [0.0 if x is None else x for x in parsed[:batch]]
            if self.both_orders:  # the swapped request's verdict is for the reference
                second = [0.0 if x is None else 1.0 - x for x in parsed[batch:]]
                first = [(a + b) / 2 for a, b in zip(first, second)]
            return RewardResult(vec(first))
        raw = {p: vec([0.0 if x is None else (x[p] - 1.0) / 4.0 for x in parsed]) for p in V2_PARTS}
        weights = {p: 1.0 / len(V2_PARTS) for p in V2_PARTS}
        components = {p: weights[p] * raw[p] for p in V2_PARTS}
        total = sum(components.values())
        return RewardResult(total, components, raw, weights)

    def extra_repr(self) -> str:
        judge = repr(self.judge) if isinstance(self.judge, ChatEndpointJudge) else type(self.judge).__name__
        return f"mode={self.mode!r}, judge={judge}, {super().extra_repr()}"
