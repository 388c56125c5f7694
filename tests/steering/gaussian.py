"""An analytic "model" for closed-form checks of steering: exact velocities of Gaussian data.

The data of prompt ``"m=<value>"`` is x0 ~ N(m, s²) in one dimension. Under rectified flow
x_σ = (1−σ)·x0 + σ·ε, so x_σ ~ N((1−σ)m, V) with V = (1−σ)²s² + σ², and the exact velocity is

    v(x, σ) = E[ε | x] − E[x0 | x] = (σ − (1−σ)s²)/V · (x − (1−σ)m) − m.

Every transition of visalign's samplers is then affine in x plus Gaussian noise, so the sampler's
output is exactly Gaussian. ``decode`` maps x to a grey 1×1 image 0.5 + κ·x, and
:func:`quadratic_reward` gives r = −(x − c)²/2, so ``p(x)·exp(λ·r(x))`` is a Gaussian with a
closed-form mean and variance.
"""

import torch

from visalign.pipelines.base import Conditioning, Geometry, Policy, Schedule

KAPPA = 0.02


class GaussianFlowPolicy(Policy):
    family = "gaussian"
    is_flow = True

    def __init__(self, data_std: float = 1.0):
        self.data_std = float(data_std)
        self.calls = 0

    @property
    def device(self):
        return torch.device("cpu")

    @property
    def dtype(self):
        return torch.float32

    def geometry(self, height=None, width=None, num_frames=None):
        return Geometry(1, 1)

    def noise_shape(self, batch_size, geometry):
        return (batch_size, 1)

    def encode_prompt(self, prompts, negative_prompts=None, guidance_scale=None, images=None, geometry=None, **kw):
        means = torch.tensor([[float(p.split("=")[1])] for p in prompts])
        return Conditioning(cond={"mean": means})

    def schedule(self, num_steps, geometry):
        sigmas = torch.linspace(1.0, 0.0, num_steps + 1)
        return Schedule(timesteps=sigmas[:-1] * 1000, sigmas=sigmas)

    def forward(self, latents, timesteps, kwargs, shared):
        self.calls += latents.shape[0]
        sigma = (timesteps.float() / 1000).view(-1, 1)
        m, s2 = kwargs["mean"], self.data_std**2
        variance = (1 - sigma) ** 2 * s2 + sigma**2
        return (sigma - (1 - sigma) * s2) / variance * (latents - (1 - sigma) * m) - m

    def decode(self, latents, geometry):
        return (0.5 + KAPPA * latents[:, :1]).clamp(0, 1).view(-1, 1, 1, 1).expand(-1, 3, 1, 1)


def latent_of(images):
    """The x a decoded image came from."""
    return (images[:, 0, 0, 0] - 0.5) / KAPPA


def quadratic_reward(center: float):
    """r(x) = −(x − center)²/2 on the decoded images."""

    def reward(images, prompts):
        return -0.5 * (latent_of(images) - center) ** 2

    return reward


def tilted_gaussian(mean: float, var: float, lam: float, center: float):
    """Mean and variance of N(mean, var)·exp(−lam·(x − center)²/2), normalised."""
    precision = 1.0 / var + lam
    return (mean / var + lam * center) / precision, 1.0 / precision


def exact_output(policy: GaussianFlowPolicy, prompt: str, num_steps: int, sampler: str = "sde", eta=None):
    """Mean and variance of the sampler's output, exactly: every transition is affine + Gaussian.

    Each step's mean is a·x + b (read off :func:`visalign.sampling.transition` at x = 0 and 1),
    so the output moments follow mean ← a·mean + b, var ← a²·var + std².
    """
    from visalign.sampling import SamplerSpec, transition

    spec = SamplerSpec.resolve(policy, sampler, "flow", eta, "mean", None, num_steps)
    schedule = policy.schedule(num_steps, policy.geometry())
    conditioning = policy.encode_prompt([prompt, prompt])
    mean, var = 0.0, 1.0
    for i in range(num_steps):
        x = torch.tensor([[0.0], [1.0]])
        v = policy.predict(x, schedule.timesteps[i], conditioning)
        step_mean, std, _ = transition(policy, spec, schedule, i, x, v)
        b, a = float(step_mean[0, 0]), float(step_mean[1, 0] - step_mean[0, 0])
        mean, var = a * mean + b, a * a * var + float(torch.as_tensor(std).flatten()[0]) ** 2
    return mean, var
