"""Sampling with exact per-step log-probs: the options (:mod:`.options`) and the loop (:mod:`.sampler`);
the step math is :mod:`visalign.steps`."""

from visalign.sampling.options import DEFAULT_ETA, SAMPLERS, SamplingOptions  # noqa: F401
from visalign.sampling.sampler import (  # noqa: F401
    LogProbOutput, SamplerSpec, SamplingSetup, StepOutput, Trajectory, denoise_step, log_prob, prepare_sampling,
    sample, transition, with_sampling_keywords,
)

__all__ = ["DEFAULT_ETA", "SAMPLERS", "LogProbOutput", "SamplerSpec", "SamplingOptions", "SamplingSetup", "StepOutput",
           "Trajectory", "denoise_step", "log_prob", "prepare_sampling", "sample", "transition",
           "with_sampling_keywords"]
