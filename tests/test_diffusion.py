"""Schedules, q_sample, targets and the DDPM / DDIM samplers on a 1-D Gaussian whose answer is known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxml import diffusion
from jaxml.train import optim

MU, SIGMA = 0.5, 0.3  # the toy data distribution N(MU, SIGMA^2)


def exact_epsilon(schedule):
    """E[eps | x_t] for x_0 ~ N(MU, SIGMA^2): the Bayes-optimal epsilon-predictor, so any
    correct sampler must return N(MU, SIGMA^2)."""
    def denoise(x_t, t_B):
        abar = schedule.alphas_cumprod[t_B].reshape((-1,) + (1,) * (x_t.ndim - 1))
        var_t = abar * SIGMA**2 + 1.0 - abar
        return jnp.sqrt(1.0 - abar) * (x_t - jnp.sqrt(abar) * MU) / var_t
    return denoise


@pytest.mark.parametrize("make", [diffusion.linear_schedule, diffusion.cosine_schedule])
def test_schedules_are_valid(make):
    s = make(100)
    assert s.betas.shape == (100,) and bool(jnp.all((s.betas > 0) & (s.betas < 1)))
    assert bool(jnp.all(jnp.diff(s.alphas_cumprod) < 0)) and float(s.alphas_cumprod[-1]) < 1e-3


def test_q_sample_moments_match_closed_form():
    s = diffusion.linear_schedule(50)
    x0 = jnp.full((20000, 1), 0.7)
    for t in (0, 10, 49):
        t_B = jnp.full((20000,), t)
        x_t = diffusion.q_sample(s, x0, t_B, jax.random.normal(jax.random.key(t), x0.shape))
        abar = float(s.alphas_cumprod[t])
        np.testing.assert_allclose(float(x_t.mean()), np.sqrt(abar) * 0.7, atol=0.02)
        np.testing.assert_allclose(float(x_t.var()), 1.0 - abar, rtol=0.05)


@pytest.mark.parametrize("kind", diffusion.TARGETS)
def test_targets_invert_to_x0_and_eps(kind):
    s = diffusion.cosine_schedule(20)
    k1, k2 = jax.random.split(jax.random.key(0))
    x0, eps = jax.random.normal(k1, (8, 4, 4, 1)), jax.random.normal(k2, (8, 4, 4, 1))
    t_B = jnp.arange(8) * 2
    x_t = diffusion.q_sample(s, x0, t_B, eps)
    x0_hat, eps_hat = diffusion.to_x0_and_eps(kind, s, x_t, t_B, diffusion.training_target(kind, s, x0, eps, t_B))
    np.testing.assert_allclose(x0_hat, x0, atol=2e-3)
    np.testing.assert_allclose(eps_hat, eps, atol=2e-3)


def test_ddpm_and_ddim_reach_the_known_distribution():
    # Both samplers are discretisations: with 25 DDIM steps the std comes out ~0.25, with
    # 1000 levels (DDPM) and 200 steps (DDIM) within a few percent of 0.3.
    s = diffusion.linear_schedule(1000)
    denoise = exact_epsilon(s)
    shape = (4000, 1)
    ddpm = jax.jit(lambda r: diffusion.ddpm_sample(r, denoise, s, shape, clip=None))(jax.random.key(0))
    ddim = jax.jit(lambda r: diffusion.ddim_sample(r, denoise, s, shape, num_steps=200, clip=None))
    a, b = ddim(jax.random.key(1)), ddim(jax.random.key(1))
    np.testing.assert_array_equal(a, b)  # eta = 0: a function of the starting noise only
    for x in (ddpm, a):
        np.testing.assert_allclose(float(x.mean()), MU, atol=0.03)
        np.testing.assert_allclose(float(x.std()), SIGMA, rtol=0.05)
    assert abs(float(ddpm.std()) - float(a.std())) < 0.015


def test_guidance_formula():
    cond, uncond = (lambda x, t: x + 1.0), (lambda x, t: x)
    out = diffusion.guided(cond, uncond, 2.0)(jnp.zeros((2, 1)), jnp.zeros((2,), jnp.int32))
    np.testing.assert_allclose(out, 3.0)  # (1 + w) * 1 - w * 0


def test_ema_update_matches_formula():
    ema, params = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, -2.0])}
    out = optim.ema_update(ema, params, 0.9)
    np.testing.assert_allclose(out["w"], 0.9 * np.array([1.0, 2.0]) + 0.1 * np.array([3.0, -2.0]), rtol=1e-6)


def test_ddim_rejects_more_steps_than_levels():
    s = diffusion.linear_schedule(10)
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, 10\].*got 11"):
        diffusion.ddim_sample(jax.random.key(0), exact_epsilon(s), s, (2, 1), num_steps=11)
