"""Variational autoencoder: ELBO training, importance-weighted log-likelihood bound, pictures.

    python -m experiments.vae --workdir=/tmp/vae                              # offline digits
    python -m experiments.vae --config=experiments/vae.py:mnist

Eval reports, per test image in nats: `elbo` = `log_likelihood` - `kl` (one posterior sample)
and `iwae` (the importance-weighted bound with `model.iwae_samples` samples), which is a
tighter lower bound on log p(x): iwae >= elbo. Pixels are intensities in [0, 1] under a
Bernoulli decoder (the usual continuous relaxation), so these are not discrete log-likelihoods.
Measured (digits, 3000 steps, 22 s user+sys CPU, 21 s wall on 2 CPU cores with a warm
compilation cache; ~1.5 min when the cores were shared): test ELBO -23.65 nats
(log-likelihood -19.84, KL 3.81), IWAE (100 samples) -23.34 >= ELBO; mostly recognisable samples.
Writes samples.png, reconstructions.png and interpolation.png into the workdir.
"""

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxml import config as config_lib
from jaxml import data, plots
from jaxml.models import autoencoder
from jaxml.train import optim, parallel
from jaxml.train.state import TrainState


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Defaults for the offline digits run; presets: tiny (tests), mnist, fashion_mnist."""
    c = config_lib.base_config()
    c.model = ml_collections.ConfigDict(dict(
        hidden=(256, 128),
        latent=8,
        likelihood="bernoulli",  # bernoulli | gaussian
        image_shape=(8, 8, 1),
        iwae_samples=100,
    ))
    c.optim.lr = 2e-3
    c.optim.schedule = "warmup_cosine"
    c.optim.warmup_steps = 100
    c.train.steps = 3000
    c.train.eval_every = 1000
    c.checkpoint.every_steps = 1000
    if preset is None or preset == "":
        return c
    if preset == "tiny":
        c.model.update(hidden=(16,), latent=2, iwae_samples=4)
        c.train.steps, c.train.log_every, c.train.eval_every = 6, 2, 3
        c.checkpoint.every_steps = 3
        c.optim.warmup_steps = 1
        c.data.batch_size = 16
    elif preset in ("mnist", "fashion_mnist"):
        c.data.name = preset
        c.model.update(hidden=(512, 256), latent=16, image_shape=(28, 28, 1))
        c.train.steps = 20_000
    else:
        raise ValueError(f"unknown preset {preset!r}; presets: tiny, mnist, fashion_mnist")
    return c


def model(config) -> nn.Module:
    m = config.model
    return autoencoder.mlp_vae(tuple(m.image_shape), tuple(m.hidden), m.latent, m.likelihood)


def _inputs(batch):
    return batch["image"].astype(jnp.float32) / 255.0


def init(config, rng, batch) -> TrainState:
    params = model(config).init(rng, jax.random.key(0), _inputs(batch))["params"]
    return TrainState.create(params, optim.make_optimizer(config.optim, config.train.steps),
                             ema_decay=config.optim.ema_decay)


def train_step(config, state: TrainState, batch, rng):
    def loss_fn(params):
        out = model(config).apply({"params": params}, rng, _inputs(batch))
        elbo_B = out["log_likelihood"] - out["kl"]
        return -elbo_B.mean(), out

    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = parallel.mean_over_devices(grads)
    state = state.apply_gradients(grads, optim.make_optimizer(config.optim, config.train.steps),
                                  ema_decay=config.optim.ema_decay)
    return state, {"loss": loss, "kl": out["kl"].mean(), "log_likelihood": out["log_likelihood"].mean(),
                   "grad_norm": optax.tree.norm(grads)}


def eval_step(config, state: TrainState, batch):
    # Fixed keys: eval numbers are comparable across evals and reruns.
    x = _inputs(batch)
    vae = model(config)
    out = vae.apply({"params": state.params}, jax.random.key(1), x)
    iwae_B = vae.apply({"params": state.params}, jax.random.key(2), x, config.model.iwae_samples,
                       method=autoencoder.VAE.iwae_bound)
    mask = batch["mask"]
    return {"elbo": ((out["log_likelihood"] - out["kl"]) * mask).sum(), "kl": (out["kl"] * mask).sum(),
            "log_likelihood": (out["log_likelihood"] * mask).sum(), "iwae": (iwae_B * mask).sum(),
            "count": mask.sum()}


def report(config, state, workdir, eval_sums) -> None:
    """samples.png (z ~ prior), reconstructions.png (inputs over posterior-mean reconstructions),
    interpolation.png (decoded straight lines between posterior means of test pairs)."""
    vae, params, m = model(config), state.params, config.model
    dc = config.data
    test = data.load_source(dc.name, dc.eval_split, dc.data_dir, cache=True)
    images = test.arrays["image"][:10].astype(np.float32) / 255.0
    generate = jax.jit(lambda z: vae.apply({"params": params}, z, method=autoencoder.VAE.generate))
    z = jax.random.normal(jax.random.key(config.seed + 1), (100, m.latent))
    title = "" if eval_sums is None else (
        f"test ELBO {float(eval_sums['elbo']) / float(eval_sums['count']):.2f} nats, "
        f"IWAE {float(eval_sums['iwae']) / float(eval_sums['count']):.2f}")
    plots.image_grid(os.path.join(workdir, "samples.png"), np.asarray(generate(z)), 10, title=title)
    mean, _ = jax.jit(lambda x: vae.apply({"params": params}, x, method=autoencoder.VAE.posterior))(images)
    plots.image_grid(os.path.join(workdir, "reconstructions.png"),
                     np.concatenate([images, np.asarray(generate(mean))]), 10, row_labels=["input", "recon"])
    steps = jnp.linspace(0.0, 1.0, 10)[:, None]
    pairs = [(0, 1), (2, 3), (4, 5)]
    strips = [generate((1 - steps) * mean[a] + steps * mean[b]) for a, b in pairs]
    plots.image_grid(os.path.join(workdir, "interpolation.png"), np.concatenate([np.asarray(s) for s in strips]), 10,
                     title="latent interpolation between test digits")


if __name__ == "__main__":
    from jaxml import cli

    cli.main(sys.modules[__name__])
