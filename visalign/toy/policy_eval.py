"""How good is a policy on the toy world? One fixed, seeded measurement shared by the demo, the
slow tests and the benchmarks, so their numbers are comparable.

Example::

    import visalign as va
    from visalign.toy.policy_eval import eval_set, evaluate_policy

    policy = va.load(toy_model_path("t2i"), policy_kwargs={"max_sequence_length": 1})
    prompts, seeds = eval_set(48)
    result = evaluate_policy(policy, prompts, seeds, num_steps=10, guidance_scale=3.0)
    result["all_correct"], result["accuracy"]["shape"]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from visalign.toy.evaluator import evaluate
from visalign.toy.world import all_captions

# Seeds of the evaluation noise start here, far from the seeds training draws from.
EVAL_SEED_BASE = 1000


def eval_set(num_prompts: int = 48, stride: int = 7) -> tuple[list[str], list[int]]:
    """A fixed spread of the world's 90 captions (every ``stride``-th, wrapping) with one seed each."""
    captions = all_captions()
    prompts = [captions[(i * stride) % len(captions)] for i in range(num_prompts)]
    return prompts, list(range(EVAL_SEED_BASE, EVAL_SEED_BASE + num_prompts))


def evaluate_policy(
    policy,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_steps: int = 10,
    guidance_scale: float = 3.0,
    reward=None,
    height: int = 32,
    width: int = 32,
) -> dict:
    """Samples each prompt once with the ODE sampler from its seed and scores it.

    Args:
        policy: a :class:`~visalign.pipelines.Policy` of the toy world (or any image policy).
        prompts, seeds: one seed per prompt; sample i starts from ``torch.Generator().manual_seed(seeds[i])``.
        num_steps, guidance_scale, height, width: the sampling settings.
        reward: optionally a reward whose mean is reported too (``"reward"``).

    Returns:
        The evaluator's dict (:func:`visalign.toy.evaluate`: ``all_correct``, ``accuracy``, ...)
        plus ``"images"`` and, with a reward, ``"reward"`` (the mean).
    """
    from visalign.sampling import sample

    if len(seeds) != len(prompts):
        from visalign.errors import InvalidInputError

        raise InvalidInputError(
            f"evaluate_policy got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed each."
        )
    with torch.no_grad():
        traj = sample(
            policy,
            list(prompts),
            num_steps=num_steps,
            sampler="ode",
            guidance_scale=guidance_scale,
            generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
            height=height,
            width=width,
        )
        result = evaluate(traj.images.float().cpu(), list(prompts))
        result["images"] = traj.images
        if reward is not None:
            result["reward"] = float(reward(traj.images, list(prompts)).mean())
    return result
