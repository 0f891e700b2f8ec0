"""Autoencoders and the VAE: shapes, the KL term, and the IWAE bound >= ELBO."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxml.models import autoencoder


def test_kl_is_zero_for_the_prior_and_positive_otherwise():
    zeros = jnp.zeros((3, 5))
    np.testing.assert_allclose(autoencoder.gaussian_kl(zeros, zeros), 0.0, atol=1e-7)
    assert bool(jnp.all(autoencoder.gaussian_kl(zeros + 0.5, zeros - 1.0) > 0))
    # Closed form for one dimension: 0.5 (s^2 + m^2 - 1 - log s^2).
    np.testing.assert_allclose(autoencoder.gaussian_kl(jnp.array([[1.0]]), jnp.log(jnp.array([[4.0]]))),
                               [0.5 * (4 + 1 - 1 - np.log(4))], rtol=1e-6)


@pytest.mark.parametrize("make", [autoencoder.mlp_autoencoder, autoencoder.conv_autoencoder])
def test_autoencoders_reconstruct_to_the_input_shape(make):
    m = make((8, 8, 1))
    x = jnp.ones((2, 8, 8, 1))
    variables = jax.eval_shape(lambda: m.init(jax.random.key(0), x))
    assert jax.eval_shape(lambda v: m.apply(v, x), variables).shape == x.shape


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_iwae_bound_is_at_least_the_elbo(likelihood):
    vae = autoencoder.mlp_vae((8, 8, 1), hidden=(16,), latent=3, likelihood=likelihood)
    x = jax.random.uniform(jax.random.key(0), (16, 8, 8, 1))

    @jax.jit
    def bounds(key):
        variables = vae.init(key, key, x)
        elbo = jax.vmap(lambda k: (lambda o: o["log_likelihood"] - o["kl"])(vae.apply(variables, k, x)))(
            jax.random.split(key, 200)).mean(0)  # expected ELBO, by Monte Carlo
        iwae = vae.apply(variables, key, x, 200, method=autoencoder.VAE.iwae_bound)
        single = vae.apply(variables, key, x, 1, method=autoencoder.VAE.iwae_bound)
        return elbo, iwae, single

    elbo, iwae, single = bounds(jax.random.key(1))
    assert bool(jnp.all(iwae >= elbo - 1e-3)), (iwae, elbo)
    np.testing.assert_allclose(single.mean(), elbo.mean(), rtol=0.1)  # K = 1 is the ELBO


def test_vae_rejects_an_encoder_of_the_wrong_width():
    bad = autoencoder.VAE(autoencoder.MLPEncoder((8,), 5), autoencoder.MLPDecoder((8,), (8, 8, 1)), latent=3)
    with pytest.raises(ValueError, match=r"2 \* latent = 6 numbers, got \(1, 5\)"):
        jax.eval_shape(lambda: bad.init(jax.random.key(0), jax.random.key(1), jnp.ones((1, 8, 8, 1))))
