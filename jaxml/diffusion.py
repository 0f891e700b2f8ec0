"""Gaussian diffusion: noise schedules, `q_sample`, training targets, DDPM and DDIM samplers.

Conventions (Ho et al. 2020; Song et al. 2021; Salimans & Ho 2022 for v):
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   t = 0 .. T-1 (t = 0 is the least noisy level)
A model predicts one of `epsilon`, `x0` or `v = sqrt(abar) eps - sqrt(1 - abar) x_0`; the samplers
convert any of them to (x0_hat, eps_hat). Samplers are `lax.scan`s over a `denoise(x_t, t_B)`
callable; jit the function that calls them (the experiments do), so the whole chain is one program.
Classifier-free guidance is a denoiser wrapper: `guided(cond, uncond, scale)`.
"""

import math
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

TARGETS = ("epsilon", "x0", "v")
Denoiser = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t, t_B int32) -> prediction like x_t


@flax.struct.dataclass
class Schedule:
    """Per-level tables of a discrete schedule with T levels (all float32 of shape (T,))."""

    betas: Float[Array, "T"]
    alphas_cumprod: Float[Array, "T"]

    @property
    def num_steps(self) -> int:
        return self.betas.shape[0]


def linear_schedule(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """DDPM's linear betas, rescaled so that any T has about the same total noise as T=1000
    (clipped below 1: with T < 50 the rescaled end would pass it)."""
    scale = 1000.0 / num_steps
    betas = jnp.linspace(beta_start * scale, beta_end * scale, num_steps, dtype=jnp.float32)
    betas = jnp.minimum(betas, 0.999)
    return Schedule(betas=betas, alphas_cumprod=jnp.cumprod(1.0 - betas))


def cosine_schedule(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
    """Nichol & Dhariwal's cosine abar(t); betas clipped at max_beta so the last level stays finite."""
    t = jnp.arange(num_steps + 1, dtype=jnp.float32) / num_steps
    f = jnp.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = jnp.clip(1.0 - f[1:] / f[:-1], 0.0, max_beta)
    return Schedule(betas=betas, alphas_cumprod=jnp.cumprod(1.0 - betas))


def make_schedule(kind: str, num_steps: int) -> Schedule:
    """`linear` or `cosine` with `num_steps` levels."""
    if kind == "linear":
        return linear_schedule(num_steps)
    elif kind == "cosine":
        return cosine_schedule(num_steps)
    raise ValueError(f"unknown schedule {kind!r}; expected 'linear' or 'cosine'")


def _per_example(values_T: jax.Array, t_B: jax.Array, like: jax.Array) -> jax.Array:
    """values[t] broadcast against `like` (B, ...)."""
    return values_T[t_B].reshape((-1,) + (1,) * (like.ndim - 1))


def q_sample(schedule: Schedule, x0: Float[Array, "B *dims"], t_B: Int[Array, "B"],
             noise: Float[Array, "B *dims"]) -> Float[Array, "B *dims"]:
    """A draw of x_t given x_0: sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
    abar = _per_example(schedule.alphas_cumprod, t_B, x0)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def training_target(kind: str, schedule: Schedule, x0: jax.Array, noise: jax.Array,
                    t_B: jax.Array) -> jax.Array:
    """What the model regresses to: the noise, x_0, or v."""
    if kind == "epsilon":
        return noise
    elif kind == "x0":
        return x0
    elif kind == "v":
        abar = _per_example(schedule.alphas_cumprod, t_B, x0)
        return jnp.sqrt(abar) * noise - jnp.sqrt(1.0 - abar) * x0
    raise ValueError(f"unknown target {kind!r}; expected one of {TARGETS}")


def to_x0_and_eps(kind: str, schedule: Schedule, x_t: jax.Array, t_B: jax.Array,
                  prediction: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x0_hat, eps_hat) from a model's prediction of `kind` at x_t."""
    abar = _per_example(schedule.alphas_cumprod, t_B, x_t)
    a, s = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
    if kind == "epsilon":
        return (x_t - s * prediction) / a, prediction
    elif kind == "x0":
        return prediction, (x_t - a * prediction) / s
    elif kind == "v":
        x0 = a * x_t - s * prediction
        return x0, s * x_t + a * prediction
    raise ValueError(f"unknown target {kind!r}; expected one of {TARGETS}")


def guided(cond: Denoiser, uncond: Denoiser, scale: float) -> Denoiser:
    """Classifier-free guidance: (1 + w) cond - w uncond (Ho & Salimans 2022); w = 0 is plain conditional."""
    def denoise(x_t, t_B):
        c, u = cond(x_t, t_B), uncond(x_t, t_B)
        return (1.0 + scale) * c - scale * u
    return denoise


def ddpm_sample(rng: PRNGKeyArray, denoise: Denoiser, schedule: Schedule, shape: tuple[int, ...],
                target: str = "epsilon", clip: float | None = 1.0) -> jax.Array:
    """Ancestral sampling through all T levels (posterior q(x_{t-1} | x_t, x0_hat) each step).

    `clip` bounds x0_hat (data scaled to [-1, 1]); None leaves it free.
    """
    betas, abar = schedule.betas, schedule.alphas_cumprod
    abar_prev = jnp.concatenate([jnp.ones((1,), abar.dtype), abar[:-1]])
    # Posterior mean coefficients and the (clipped-at-t=0) posterior variance.
    coef_x0 = betas * jnp.sqrt(abar_prev) / (1.0 - abar)
    coef_xt = (1.0 - abar_prev) * jnp.sqrt(1.0 - betas) / (1.0 - abar)
    var = betas * (1.0 - abar_prev) / (1.0 - abar)
    init_rng, step_rng = jax.random.split(rng)
    x_T = jax.random.normal(init_rng, shape, jnp.float32)

    def step(x_t, t):
        t_B = jnp.full((shape[0],), t, jnp.int32)
        x0, _ = to_x0_and_eps(target, schedule, x_t, t_B, denoise(x_t, t_B))
        if clip is not None:
            x0 = jnp.clip(x0, -clip, clip)
        mean = coef_x0[t] * x0 + coef_xt[t] * x_t
        noise = jax.random.normal(jax.random.fold_in(step_rng, t), shape, jnp.float32)
        return mean + jnp.where(t > 0, jnp.sqrt(var[t]), 0.0) * noise, None

    x_0, _ = jax.lax.scan(step, x_T, jnp.arange(schedule.num_steps - 1, -1, -1))
    return x_0


def ddim_sample(rng: PRNGKeyArray, denoise: Denoiser, schedule: Schedule, shape: tuple[int, ...],
                num_steps: int, target: str = "epsilon", eta: float = 0.0,
                clip: float | None = 1.0) -> jax.Array:
    """DDIM on `num_steps` evenly spaced levels; eta = 0 is deterministic given the starting noise."""
    T = schedule.num_steps
    if not 1 <= num_steps <= T:
        raise ValueError(f"ddim num_steps must be in [1, {T}] (the schedule's levels), got {num_steps}")
    # Levels from T-1 down to 0; each step jumps to the next one (or to x_0 after level 0).
    ts = jnp.asarray([round(i * (T - 1) / max(num_steps - 1, 1)) for i in range(num_steps)][::-1], jnp.int32)
    t_next = jnp.concatenate([ts[1:], jnp.full((1,), -1, jnp.int32)])
    abar = schedule.alphas_cumprod
    init_rng, step_rng = jax.random.split(rng)
    x_T = jax.random.normal(init_rng, shape, jnp.float32)

    def step(x_t, ts_pair):
        t, tn = ts_pair
        t_B = jnp.full((shape[0],), t, jnp.int32)
        x0, eps = to_x0_and_eps(target, schedule, x_t, t_B, denoise(x_t, t_B))
        if clip is not None:
            x0 = jnp.clip(x0, -clip, clip)
            # Keep eps consistent with the clipped x0 so the jump stays on the same trajectory.
            eps = (x_t - jnp.sqrt(abar[t]) * x0) / jnp.sqrt(1.0 - abar[t])
        a_t, a_n = abar[t], jnp.where(tn >= 0, abar[jnp.maximum(tn, 0)], 1.0)
        sigma = eta * jnp.sqrt((1.0 - a_n) / (1.0 - a_t) * (1.0 - a_t / a_n))
        noise = jax.random.normal(jax.random.fold_in(step_rng, t), shape, jnp.float32)
        x_n = jnp.sqrt(a_n) * x0 + jnp.sqrt(jnp.maximum(1.0 - a_n - sigma**2, 0.0)) * eps + sigma * noise
        return x_n, None

    x_0, _ = jax.lax.scan(step, x_T, (ts, t_next))
    return x_0

