"""Sampling with exact per-step log-probs: the options (:mod:`.options`), the preparation
(:mod:`.prepare`), the loop and log-prob recomputation (:mod:`.sampler`) and what they produce
(:mod:`.trajectory`); the step math is :mod:`visalign.steps`.
"""

from visalign.sampling.options import DEFAULT_ETA, SAMPLERS, SamplingOptions  # noqa: F401
from visalign.sampling.prepare import SamplingSetup, prepare_sampling, with_sampling_keywords  # noqa: F401
from visalign.sampling.sampler import LogProbOutput, StepOutput, denoise_step, log_prob, sample, transition  # noqa: F401
from visalign.sampling.trajectory import SamplerSpec, Trajectory  # noqa: F401

__all__ = [
    "DEFAULT_ETA",
    "SAMPLERS",
    "LogProbOutput",
    "SamplerSpec",
    "SamplingOptions",
    "SamplingSetup",
    "StepOutput",
    "Trajectory",
    "denoise_step",
    "log_prob",
    "prepare_sampling",
    "sample",
    "transition",
    "with_sampling_keywords",
]
