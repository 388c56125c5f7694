"""FK steering: exactness against plain sampling, the closed-form target, weights, and every family."""

import math

import pytest
import torch

import visalign as va
from tests.conftest import PROMPTS, first_frames, size_kwargs
from tests.steering.gaussian import GaussianFlowPolicy, exact_output, latent_of, quadratic_reward, tilted_gaussian
from visalign.errors import ConfigError, SamplerError
from visalign.rewards import SegmentalVideoReward
from visalign.steering import resampling as R
from visalign.steering import reward_steps
from visalign.testing import brightness


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("family,sampler", [("sd3", "sde"), ("sd", "ddim")])
def test_one_particle_is_plain_sampling(tiny_policies, family, sampler):
    policy = tiny_policies(family)
    traj = va.sample(policy, PROMPTS, num_steps=6, sampler=sampler, generator=_gen(), **size_kwargs(family))
    out = va.fk_steer(
        policy,
        PROMPTS,
        brightness,
        num_particles=1,
        lam=50.0,
        resample_every=2,
        num_steps=6,
        sampler=sampler,
        generator=_gen(),
        **size_kwargs(family),
    )
    assert torch.equal(out.images, traj.images)
    assert torch.equal(out.particle_latents[:, 0], traj.final_latents)
    assert out.resampled[:, out.reward_steps].all() and bool((out.ess == 1).all())


def test_lam_zero_keeps_weights_uniform(tiny_policies):
    policy, n = tiny_policies("sd3"), 3
    out = va.fk_steer(
        policy,
        PROMPTS,
        brightness,
        num_particles=n,
        lam=0.0,
        resample_every=2,
        num_steps=6,
        resample_final=False,
        generator=_gen(),
        **size_kwargs("sd3"),
    )
    torch.testing.assert_close(out.log_weights, torch.full((2, n), -math.log(n), dtype=torch.float64))
    torch.testing.assert_close(out.ess, torch.full((2, 6), float(n), dtype=torch.float64))
    # Systematic resampling of uniform weights keeps every particle in place.
    assert out.ancestry.tolist() == torch.arange(n).expand(2, 6, n).tolist()
    assert torch.isfinite(out.step_rewards[:, out.reward_steps + [5]]).all()


def test_chunked_model_calls_match_one_batch(tiny_policies):
    policy = tiny_policies("sd3")
    kwargs = dict(num_particles=3, lam=200.0, resample_every=2, num_steps=5, **size_kwargs("sd3"))
    whole = va.fk_steer(policy, PROMPTS, brightness, generator=_gen(4), **kwargs)
    chunked = va.fk_steer(policy, PROMPTS, brightness, generator=_gen(4), max_batch_size=2, **kwargs)
    torch.testing.assert_close(chunked.particle_latents, whole.particle_latents, rtol=0, atol=1e-5)
    assert torch.equal(chunked.ancestry, whole.ancestry)


# ----------------------------------------------------------------------------- the target, in closed form
GAUSS_PROMPTS = ["m=1.5", "m=-1.5"]
CENTER, LAM, STEPS, N = 0.0, 1.0, 10, 16000
# "add" multiplies exp(λ·Σr) over the reward steps, so the final correction has more to undo and its
# weights degenerate faster: it gets one reward step fewer to keep the Monte Carlo error small.
EVERY = {"max": 3, "add": 4, "diff": 3, "rt": 3}
TOL = 0.06  # measured errors ≤ 0.023 over 8 seeds; dropping the correction misses by ≥ 0.2


def _targets(policy):
    return [tilted_gaussian(*exact_output(policy, p, STEPS), LAM, CENTER) for p in GAUSS_PROMPTS]


def _estimates(out):
    """Weighted mean and variance of the final particles of each prompt."""
    x = latent_of(out.particles.flatten(0, 1)).view(len(GAUSS_PROMPTS), -1).double()
    w = out.log_weights.exp()
    mean = (w * x).sum(1)
    return mean, (w * (x - mean[:, None]) ** 2).sum(1)


def _gauss_fk(potential, **kwargs):
    kwargs = {"resample_every": EVERY[potential], "resample_final": False, **kwargs}
    return va.fk_steer(
        GaussianFlowPolicy(),
        GAUSS_PROMPTS,
        quadratic_reward(CENTER),
        num_particles=N,
        potential=potential,
        lam=LAM,
        num_steps=STEPS,
        generator=_gen(0),
        **kwargs,
    )


@pytest.mark.parametrize("potential", ["max", "add", "diff", "rt"])
def test_final_correction_targets_p_times_exp_lam_r(potential):
    # Exact target: N(base mean, base var)·exp(−λ(x−c)²/2); each prompt has its own base (m = ±1.5),
    # so particles of one prompt picking up the other's conditioning would miss by ~1.5.
    targets = _targets(GaussianFlowPolicy())
    mean, var = _estimates(_gauss_fk(potential))
    for p, (target_mean, target_var) in enumerate(targets):
        assert abs(float(mean[p]) - target_mean) < TOL, (potential, p, float(mean[p]), target_mean)
        assert abs(float(var[p]) - target_var) < TOL, (potential, p, float(var[p]), target_var)
    # Resampling at the final step too: equally weighted draws from the same target.
    resampled = _gauss_fk(potential, resample_final=True)
    torch.testing.assert_close(resampled.log_weights, torch.full_like(resampled.log_weights, -math.log(N)))
    mean, _ = _estimates(resampled)
    for p, (target_mean, _) in enumerate(targets):
        assert abs(float(mean[p]) - target_mean) < TOL, (potential, p, float(mean[p]), target_mean)


@pytest.mark.parametrize("potential", ["max", "add", "diff", "rt"])
def test_the_target_check_fails_without_the_correction(monkeypatch, potential):
    # The reference's gap: keep exp(λ·r(x0)) at the end without dividing by the earlier potentials.
    import visalign.steering.fk as fk

    monkeypatch.setattr(fk.R, "final_log_potential", lambda lam, rewards, log_prod: lam * rewards.double())
    targets = _targets(GaussianFlowPolicy())
    mean, _ = _estimates(_gauss_fk(potential))
    assert max(abs(float(mean[p]) - targets[p][0]) for p in range(2)) > 3 * TOL


def test_adaptive_resampling_carries_weights(tiny_policies):
    # A threshold no ESS falls under: never resample, so the weights carry through every reward step
    # and the final correction telescopes them to exactly λ·r(x0).
    policy, n, lam = tiny_policies("sd3"), 4, 300.0
    out = va.fk_steer(
        policy,
        PROMPTS,
        brightness,
        num_particles=n,
        lam=lam,
        potential="add",
        resample_every=2,
        num_steps=6,
        adaptive=True,
        ess_threshold=1e-9,
        generator=_gen(1),
        **size_kwargs("sd3"),
    )
    assert not out.resampled.any()
    torch.testing.assert_close(
        out.log_weights, R.normalize_log_weights(lam * out.particle_rewards.double()), rtol=0, atol=1e-4
    )
    # Dropping the weights at skipped steps (the reference's gap) would leave something else.
    intermediate = out.step_rewards[:, out.reward_steps].double().sum(1)
    assert not torch.allclose(R.normalize_log_weights(lam * intermediate), out.log_weights, atol=1e-3)
    # ESS follows the carried weights: after the last step it is that of the final weights.
    torch.testing.assert_close(out.ess[:, -1], R.effective_sample_size(out.log_weights))
    assert bool((out.ess[:, -1] < n).all())


def test_adaptive_resampling_still_hits_the_target():
    targets = _targets(GaussianFlowPolicy())
    out = _gauss_fk("max", adaptive=True, ess_threshold=0.7, resample_every=2)
    assert out.resampled.any() and not out.resampled[:, out.reward_steps].all()  # some skipped, some not
    mean, _ = _estimates(out)
    for p, (target_mean, _) in enumerate(targets):
        assert abs(float(mean[p]) - target_mean) < TOL


# ----------------------------------------------------------------------------- options and errors
def test_ode_and_zero_noise_are_refused(tiny_policies):
    policy = tiny_policies("sd3")
    with pytest.raises(SamplerError, match="stochastic sampler"):
        va.fk_steer(policy, PROMPTS, brightness, sampler="ode", num_steps=2, **size_kwargs("sd3"))
    with pytest.raises(SamplerError, match="eta"):
        va.fk_steer(policy, PROMPTS, brightness, eta=0.0, num_steps=2, **size_kwargs("sd3"))
    with pytest.raises(ConfigError, match="potential"):
        va.fk_steer(policy, PROMPTS, brightness, potential="sum", num_steps=2)


def test_reward_step_schedule():
    assert reward_steps(20, 5) == [4, 9, 14]  # after every 5 steps; 19 is the final step
    assert reward_steps(20, 3, (4, 12)) == [6, 9]
    assert reward_steps(10, 1) == list(range(9))  # the final step 9 scores the output
    assert reward_steps(10, None) == []
    with pytest.raises(ConfigError):
        reward_steps(10, 2, (5, 11))
    with pytest.raises(ConfigError):
        reward_steps(10, 0)


# ----------------------------------------------------------------------------- every family
def _reward_for(family):
    if family.startswith("wan"):
        return SegmentalVideoReward(brightness, segments=2, sampling="fixed")
    return brightness


@pytest.mark.parametrize("family", ["sd", "sd3", "flux", "wan-t2v", "wan-i2v"])
def test_fk_runs_on_every_family(tiny_policies, family):
    policy, n, steps = tiny_policies(family), 3, 4
    frames = first_frames(family, 2)
    out = va.fk_steer(
        policy,
        PROMPTS,
        _reward_for(family),
        num_particles=n,
        lam=100.0,
        resample_every=2,
        num_steps=steps,
        resampler="multinomial",
        generator=_gen(2),
        images=frames,
        **size_kwargs(family),
    )
    pixels = (2, 5, 3, 32, 32) if policy.is_video else (2, 3, 32, 32)
    assert out.images.shape == pixels and out.particles.shape == (2, n, *pixels[1:])
    assert out.rewards.shape == (2,) and out.particle_rewards.shape == (2, n)
    torch.testing.assert_close(out.rewards, out.particle_rewards.max(1).values)
    for p in range(2):
        torch.testing.assert_close(out.images[p], out.particles[p, out.best_index[p]])
    assert out.ess.shape == (2, steps) and bool(((out.ess >= 1 - 1e-9) & (out.ess <= n + 1e-9)).all())
    assert out.ancestry.shape == (2, steps, n) and int(out.ancestry.min()) >= 0 and int(out.ancestry.max()) < n
    assert out.reward_steps == [1] and out.num_model_evals == 2 * n * steps
    assert out.num_reward_evals == 2 * n * 2
    assert len(out.lineage(0, 0)) == steps


def test_i2v_conditioning_moves_with_its_particles(tiny_policies, monkeypatch):
    # Two prompts with different first frames, heavy resampling at every step: every model call must
    # see, in rows p·N … p·N+N−1, prompt p's own image condition.
    policy, n = tiny_policies("wan-i2v"), 3
    frames = first_frames("wan-i2v", 2, seed=5)
    frames[1] = 1 - frames[1]
    reference = policy.encode_prompt(PROMPTS, images=frames, geometry=policy.geometry(**size_kwargs("wan-i2v")))
    expected = reference.cond["image_condition"].repeat_interleave(n, 0)
    seen, predict = [], policy.predict

    def spy(latents, t, conditioning, **kwargs):
        seen.append(torch.equal(conditioning.cond["image_condition"], expected))
        return predict(latents, t, conditioning, **kwargs)

    monkeypatch.setattr(policy, "predict", spy)
    out = va.fk_steer(
        policy,
        PROMPTS,
        _reward_for("wan-i2v"),
        num_particles=n,
        lam=1e4,
        resample_every=1,
        num_steps=4,
        resampler="multinomial",
        generator=_gen(3),
        images=frames,
        **size_kwargs("wan-i2v"),
    )
    assert out.reward_steps == [0, 1, 2] and out.resampled.all()
    assert (out.ancestry[:, :3] != torch.arange(n)).any()  # particles did move
    assert len(seen) == 4 and all(seen)
