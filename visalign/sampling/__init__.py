"""Sampling with exact per-step log-probs: the step math (:mod:`.steps`) and the loop (:mod:`.sampler`)."""

from visalign.sampling.sampler import (  # noqa: F401
    SAMPLERS, LogProbOutput, SamplerSpec, SamplingSetup, StepOutput, Trajectory, denoise_step, log_prob,
    prepare_sampling, sample, transition,
)

__all__ = ["SAMPLERS", "LogProbOutput", "SamplerSpec", "SamplingSetup", "StepOutput", "Trajectory", "denoise_step",
           "log_prob", "prepare_sampling", "sample", "transition"]
