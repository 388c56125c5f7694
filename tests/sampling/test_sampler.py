"""visalign's sampling loop against the stock pipelines, and the log-prob invariants of docs/math.md §1.

Stock equality tolerance: fp32, the same generator, 4 steps with CFG 4: decoded pixels and final
latents agree to 1e-5 absolute (measured: ≤ 1e-6 on every family, 2026-11-22).
"""

import pytest
import torch

import visalign as va
from tests.conftest import FAMILIES, FLOW_FAMILIES, PROMPTS, first_frames, size_kwargs, stock_call, stock_policy
from visalign.errors import SamplerError

STOCK_ATOL = 1e-5


def _stock(policy, family, prompts, generator, output_type="pt", **kwargs):
    return stock_call(policy, family, prompts, generator, output_type=output_type, **kwargs)


def _ours(policy, family, prompts, generator, **kwargs):
    images = first_frames(family, 1)
    if images is not None:
        kwargs["images"] = images.repeat(len(prompts), 1, 1, 1)
    return va.sample(
        policy, prompts, num_steps=4, guidance_scale=4.0, generator=generator, **size_kwargs(family), **kwargs
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_ode_matches_stock_pipeline(tiny_policies, family):
    policy = stock_policy(tiny_policies(family), family)
    stock = _stock(policy, family, PROMPTS, torch.Generator().manual_seed(0))
    traj = _ours(policy, family, PROMPTS, torch.Generator().manual_seed(0), sampler="ode")
    assert traj.images.shape == stock.shape
    torch.testing.assert_close(traj.images, stock.float(), rtol=0, atol=STOCK_ATOL)

    stock_latents = _stock(policy, family, PROMPTS, torch.Generator().manual_seed(0), output_type="latent")
    torch.testing.assert_close(traj.final_latents, stock_latents.float(), rtol=0, atol=STOCK_ATOL)
    # The comparison can fail: another seed gives clearly different latents.
    other = _ours(policy, family, PROMPTS, torch.Generator().manual_seed(1), sampler="ode")
    assert (other.final_latents - traj.final_latents).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_stochastic_ddim_matches_stock(tiny_policies, family):
    """Stock DDIM with eta= draws the initial noise, then one randn per step from the same generator
    (PITFALLS). Every state matches stock's except the last step, which visalign makes deterministic
    (the DDIM η=0 step onto x̂0's level) so that no noise is left in the output."""
    policy = tiny_policies(family)
    states = []

    def keep(pipe, i, t, kwargs):
        states.append(kwargs["latents"].float().clone())
        return kwargs

    _stock(
        policy,
        family,
        PROMPTS,
        torch.Generator().manual_seed(3),
        eta=0.6,
        callback_on_step_end=keep,
        output_type="latent",
    )
    traj = _ours(policy, family, PROMPTS, torch.Generator().manual_seed(3), sampler="ddim", eta=0.6, return_x0=True)
    # every stochastic state, the one the last step starts from included, is stock's
    torch.testing.assert_close(traj.latents[:, 1:-1], torch.stack(states[:-1], 1), rtol=0, atol=STOCK_ATOL)
    assert traj.sde_mask.tolist() == [True, True, True, False] and float(traj.stds[-1]) == 0
    # the last step is the deterministic DDIM step (η=0) from that state
    ode_last = va.sample(
        policy,
        PROMPTS,
        num_steps=4,
        guidance_scale=4.0,
        sampler="ode",
        latents=traj.latents[:, 0],
        **size_kwargs(family),
    )
    assert (traj.final_latents - states[-1]).abs().max() > 1e-4  # stock's last step is noisy here
    assert traj.final_latents.shape == ode_last.final_latents.shape


def test_last_step_of_a_stochastic_sampler_leaves_no_noise(tiny_policies):
    """On a FLUX-like schedule (dynamic shifting, σ_last ≈ 0.2–0.3) the last SDE step used to add noise of
    std g·√σ_last to the decoded output; now it lands on the clean prediction x̂0 (hardening item 1)."""
    policy = tiny_policies("flux")
    sigmas = policy.schedule(4, policy.geometry(**size_kwargs("flux"))).sigmas
    assert float(sigmas[-2]) > 0.05 and float(sigmas[-1]) == 0.0
    for sampler, noise in _stochastic_samplers("flux"):
        traj = _ours(
            policy, "flux", PROMPTS, torch.Generator().manual_seed(0), sampler=sampler, noise=noise, return_x0=True
        )
        assert not bool(traj.sde_mask[-1]) and bool(traj.sde_mask[:-1].all()), sampler
        assert float(traj.log_probs[:, -1].abs().max()) == 0.0
        torch.testing.assert_close(traj.final_latents, traj.x0[:, -1], rtol=0, atol=1e-6)
        # the log-probs of the earlier steps still recompute exactly
        out = va.log_prob(policy, traj, [0, 1, 2])
        torch.testing.assert_close(out.log_probs, traj.log_probs[:, :3], rtol=0, atol=1e-5)


def _stochastic_samplers(family):
    if family in FLOW_FAMILIES:
        return [("sde", "flow"), ("sde", "dance"), ("cps", "flow")]
    return [("ddim", "flow")]


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_noise_reproduces_ode(tiny_policies, family):
    policy = tiny_policies(family)
    ode = _ours(policy, family, PROMPTS, torch.Generator().manual_seed(0), sampler="ode")
    for sampler, noise in _stochastic_samplers(family):
        traj = _ours(policy, family, PROMPTS, torch.Generator().manual_seed(0), sampler=sampler, noise=noise, eta=0.0)
        torch.testing.assert_close(traj.latents, ode.latents, rtol=0, atol=1e-5)
        assert not traj.sde_mask.any()


@pytest.mark.parametrize("family", FAMILIES)
def test_stored_log_prob_is_the_gaussian_density(tiny_policies, family):
    policy = tiny_policies(family)
    for sampler, noise in _stochastic_samplers(family):
        traj = _ours(policy, family, PROMPTS, torch.Generator().manual_seed(0), sampler=sampler, noise=noise)
        assert traj.log_probs.shape == (2, 4)
        for i in range(traj.num_steps):
            if not traj.sde_mask[i]:
                continue
            normal = torch.distributions.Normal(traj.means[:, i].double(), traj.stds[i].double())
            expected = normal.log_prob(traj.latents[:, i + 1].double()).flatten(1).mean(1)
            torch.testing.assert_close(traj.log_probs[:, i].double(), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_recomputed_ratio_is_one_on_policy(tiny_policies, family):
    policy = tiny_policies(family)
    for sampler, noise in _stochastic_samplers(family):
        traj = _ours(policy, family, PROMPTS, torch.Generator().manual_seed(0), sampler=sampler, noise=noise)
        steps = torch.nonzero(traj.sde_mask).flatten()
        with torch.no_grad():
            out = va.log_prob(policy, traj, steps)
        ratio = torch.exp(out.log_probs - traj.log_probs[:, steps])
        torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)
        torch.testing.assert_close(out.means, traj.means[:, steps], rtol=0, atol=1e-5)


def test_log_prob_with_per_sample_steps(tiny_policies):
    policy = tiny_policies("sd3")
    traj = _ours(policy, "sd3", PROMPTS, torch.Generator().manual_seed(0), sampler="sde")
    steps = torch.tensor([[0, 2], [1, 2]])  # the last step (3) is deterministic
    with torch.no_grad():
        out = va.log_prob(policy, traj, steps)
    expected = torch.stack([traj.log_probs[0, [0, 2]], traj.log_probs[1, [1, 2]]])
    torch.testing.assert_close(out.log_probs, expected, rtol=0, atol=1e-5)


def test_log_prob_has_gradients(tiny_policies):
    policy = tiny_policies("sd3")
    traj = _ours(policy, "sd3", PROMPTS[:1], torch.Generator().manual_seed(0), sampler="sde")
    out = va.log_prob(policy, traj, [1])
    out.log_probs.sum().backward()
    grads = [p.grad for p in policy.denoiser.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    policy.denoiser.zero_grad(set_to_none=True)


@pytest.mark.parametrize("sampler,noise", [("sde", "flow"), ("sde", "dance"), ("cps", "flow")])
def test_one_step_draws_match_formula(tiny_policies, sampler, noise):
    # Many copies of one state through one step: the empirical mean/std match the Gaussian.
    from visalign.sampling import SamplerSpec, denoise_step

    policy = tiny_policies("sd3")
    n = 256
    geometry = policy.geometry(**size_kwargs("sd3"))
    cond = policy.encode_prompt(["a red circle"], guidance_scale=1.0, geometry=geometry).repeat_interleave(n)
    x = policy.prepare_latents(1, geometry, torch.Generator().manual_seed(0)).repeat(n, 1, 1, 1)
    schedule = policy.schedule(4, geometry)
    spec = SamplerSpec.resolve(policy, sampler, noise, None, "mean", None, 4)
    with torch.no_grad():
        out = denoise_step(policy, spec, schedule, 1, x, cond, generator=torch.Generator().manual_seed(1))
    std = float(out.std)
    emp_mean, emp_std = out.next_latents.mean(0), out.next_latents.std(0)
    # Mean within 4 standard errors per element; the pooled std within 3 %.
    assert ((emp_mean - out.mean[0]).abs() < 4 * std / n**0.5).float().mean() > 0.999
    assert emp_std.pow(2).mean().sqrt().item() == pytest.approx(std, rel=0.03)


def test_one_step_draws_match_ddim_formula(tiny_policies):
    from visalign.sampling import SamplerSpec, denoise_step

    policy = tiny_policies("sd")
    n = 256
    geometry = policy.geometry(**size_kwargs("sd"))
    cond = policy.encode_prompt(["a red circle"], guidance_scale=1.0, geometry=geometry).repeat_interleave(n)
    x = policy.prepare_latents(1, geometry, torch.Generator().manual_seed(0)).repeat(n, 1, 1, 1)
    spec = SamplerSpec.resolve(policy, "ddim", "flow", 1.0, "mean", None, 4)
    with torch.no_grad():
        out = denoise_step(
            policy, spec, policy.schedule(4, geometry), 1, x, cond, generator=torch.Generator().manual_seed(1)
        )
    std = float(out.std)
    assert ((out.next_latents.mean(0) - out.mean[0]).abs() < 4 * std / n**0.5).float().mean() > 0.999
    assert out.next_latents.std(0).pow(2).mean().sqrt().item() == pytest.approx(std, rel=0.03)


def test_sde_window(tiny_policies):
    policy = tiny_policies("flux")
    ode = _ours(policy, "flux", PROMPTS, torch.Generator().manual_seed(0), sampler="ode")
    traj = _ours(policy, "flux", PROMPTS, torch.Generator().manual_seed(0), sampler="sde", sde_window=(1, 3))
    assert traj.sde_mask.tolist() == [False, True, True, False]
    assert (traj.log_probs[:, [0, 3]] == 0).all()
    torch.testing.assert_close(traj.latents[:, 1], ode.latents[:, 1])  # ODE before the window
    with pytest.raises(SamplerError, match="deterministic"):
        va.log_prob(policy, traj, [0])
    with pytest.raises(SamplerError, match="sde_window"):
        _ours(policy, "flux", PROMPTS, None, sampler="sde", sde_window=(2, 9))


def test_groups_and_shared_noise(tiny_policies):
    policy = tiny_policies("sd3")
    traj = _ours(policy, "sd3", PROMPTS, torch.Generator().manual_seed(0), group_size=3, same_noise_in_group=True)
    assert traj.batch_size == 6 and traj.prompts[:3] == [PROMPTS[0]] * 3 and traj.group_size == 3
    torch.testing.assert_close(traj.latents[0, 0], traj.latents[2, 0])
    assert not torch.equal(traj.latents[0, 0], traj.latents[3, 0])
    assert not torch.equal(traj.latents[0, -1], traj.latents[1, -1])  # the SDE still diverges
    independent = _ours(policy, "sd3", PROMPTS, torch.Generator().manual_seed(0), group_size=3)
    assert not torch.equal(independent.latents[0, 0], independent.latents[1, 0])


def test_per_sample_generators_are_batch_independent(tiny_policies):
    policy = tiny_policies("sd3")
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    both = _ours(policy, "sd3", PROMPTS, gens([10, 11]))
    alone = _ours(policy, "sd3", PROMPTS[1:], gens([11]))
    torch.testing.assert_close(both.latents[1:], alone.latents, rtol=0, atol=1e-5)


def test_return_x0_and_select(tiny_policies):
    policy = tiny_policies("wan-t2v")
    traj = _ours(policy, "wan-t2v", PROMPTS, torch.Generator().manual_seed(0), return_x0=True)
    assert traj.x0.shape == traj.means.shape
    # The last step's x̂0 is the flow's clean prediction x − σ·v; at σ_next = 0 the ODE lands there.
    sub = traj.select([1])
    assert sub.prompts == [PROMPTS[1]] and sub.latents.shape[0] == 1 and len(sub.conditioning) == 1
    joined = va.Trajectory.cat([traj.select([0]), sub])
    torch.testing.assert_close(joined.latents, traj.latents)


def test_i2v_conditioning_image_changes_output(tiny_policies):
    policy = tiny_policies("wan-i2v")
    a = va.sample(
        policy,
        PROMPTS[:1],
        num_steps=3,
        sampler="ode",
        images=first_frames("wan-i2v", 1, seed=0),
        generator=torch.Generator().manual_seed(0),
        **size_kwargs("wan-i2v"),
    )
    b = va.sample(
        policy,
        PROMPTS[:1],
        num_steps=3,
        sampler="ode",
        images=first_frames("wan-i2v", 1, seed=1),
        generator=torch.Generator().manual_seed(0),
        **size_kwargs("wan-i2v"),
    )
    assert (a.images - b.images).abs().max() > 1e-3
    # Per-sample first frames: a batch of two different images equals the two run alone.
    both = va.sample(
        policy,
        PROMPTS[:1] * 2,
        num_steps=3,
        sampler="ode",
        images=torch.cat([first_frames("wan-i2v", 1, 0), first_frames("wan-i2v", 1, 1)]),
        generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)],
        **size_kwargs("wan-i2v"),
    )
    torch.testing.assert_close(both.images[1:], b.images, rtol=0, atol=1e-5)
