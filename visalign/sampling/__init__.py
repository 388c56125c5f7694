"""Sampling with exact per-step log-probs: the step math (:mod:`.steps`) and the loop (:mod:`.sampler`)."""

from visalign.sampling.sampler import (  # noqa: F401
    SAMPLERS, LogProbOutput, SamplerSpec, StepOutput, Trajectory, denoise_step, log_prob, sample, transition,
)

__all__ = ["SAMPLERS", "LogProbOutput", "SamplerSpec", "StepOutput", "Trajectory", "denoise_step",
           "log_prob", "sample", "transition"]
