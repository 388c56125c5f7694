"""Inference-time steering: improve samples with a reward and no training (docs/math.md §6).

============================  ===========================================================  ==============
function                      what it does                                                 reward needs
============================  ===========================================================  ==============
:func:`fk_steer`              Feynman-Kac particles: reward x̂0, reweight, resample          values
                              (Singhal et al., arXiv 2501.06848)
:func:`best_of_n`             N independent samples per prompt, keep the best              values
:func:`reward_guidance`       add s·∇_x r(decode(x̂0(x))) to each step's mean (DPS,          gradients
                              arXiv 2209.14687; Flow-NRG, arXiv 2501.13918)
:class:`RewardGuidanceCallback`, :class:`FKResampleCallback`
                              the same ideas inside a stock diffusers pipeline's
                              ``callback_on_step_end`` (see :mod:`visalign.steering.callback`)
============================  ===========================================================  ==============

All three functions take the sampling options of :func:`visalign.sample` and return an object
with ``.images`` and ``.rewards``. The pure resampling math lives in
:mod:`visalign.steering.resampling`.
"""

from visalign.steering.best_of_n import BestOfNOutput, best_of_n
from visalign.steering.callback import FKResampleCallback, RewardGuidanceCallback
from visalign.steering.fk import FKOutput, fk_steer, reward_steps
from visalign.steering.guidance import GuidanceOutput, reward_gradient, reward_guidance
from visalign.steering.resampling import (
    effective_sample_size,
    multinomial_resample,
    normalize_log_weights,
    systematic_resample,
)

__all__ = [
    "fk_steer",
    "FKOutput",
    "reward_steps",
    "best_of_n",
    "BestOfNOutput",
    "reward_guidance",
    "GuidanceOutput",
    "reward_gradient",
    "RewardGuidanceCallback",
    "FKResampleCallback",
    "effective_sample_size",
    "normalize_log_weights",
    "multinomial_resample",
    "systematic_resample",
]
