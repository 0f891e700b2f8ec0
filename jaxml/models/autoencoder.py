"""Autoencoders: MLP and convolutional encoder/decoder pairs, and the VAE built from them.

Images are (B, H, W, C) floats in [0, 1]. Encoders map to (B, latent) vectors; a VAE's
encoder emits 2 * latent numbers (mean and log-variance of a diagonal Gaussian posterior).
"""

import functools
import math
from typing import Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from jaxml.models import _checks
from jaxml.models.dense import Dense


class MLPEncoder(nn.Module):
    """Flatten, dense-relu hidden layers, linear to `out_features`."""

    hidden: Sequence[int]
    out_features: int

    @nn.compact
    def __call__(self, x_BxHxWxC: Float[Array, "B H W C"]) -> Float[Array, "B Z"]:
        _checks.expect(self, x_BxHxWxC, "(batch, height, width, channels)", "float", "images")
        h = einops.rearrange(x_BxHxWxC, "b h w c -> b (h w c)")
        for width in self.hidden:
            h = nn.relu(Dense(width)(h))
        return Dense(self.out_features)(h)


class MLPDecoder(nn.Module):
    """Dense-relu hidden layers, linear to H*W*C logits/values reshaped to the image."""

    hidden: Sequence[int]
    image_shape: tuple[int, int, int]

    @nn.compact
    def __call__(self, z_BxZ: Float[Array, "B Z"]) -> Float[Array, "B H W C"]:
        _checks.expect(self, z_BxZ, "(batch, latent)", "float", "latents")
        h = z_BxZ
        for width in self.hidden:
            h = nn.relu(Dense(width)(h))
        height, width, channels = self.image_shape
        h = Dense(height * width * channels)(h)
        return einops.rearrange(h, "b (h w c) -> b h w c", h=height, w=width, c=channels)


class ConvEncoder(nn.Module):
    """Stride-2 conv-relu stages (each halves H and W), then linear to `out_features`;
    with `spatial=True` a 1x1 conv to `out_features` channels instead (a latent *image*)."""

    features: Sequence[int]
    out_features: int
    spatial: bool = False

    @nn.compact
    def __call__(self, x_BxHxWxC: Float[Array, "B H W C"]):
        _checks.expect(self, x_BxHxWxC, "(batch, height, width, channels)", "float", "images")
        h = x_BxHxWxC
        for width in self.features:
            h = nn.relu(nn.Conv(width, (3, 3), strides=(2, 2))(h))
            h = nn.relu(nn.Conv(width, (3, 3))(h))
        if self.spatial:
            return nn.Conv(self.out_features, (1, 1))(h)
        return Dense(self.out_features)(einops.rearrange(h, "b h w c -> b (h w c)"))


class ConvDecoder(nn.Module):
    """Mirror of ConvEncoder: (linear to the smallest grid), transposed stride-2 convs, 3x3 conv out."""

    features: Sequence[int]  # in encoder order; used reversed
    image_shape: tuple[int, int, int]
    spatial: bool = False

    @nn.compact
    def __call__(self, z):
        height, width, channels = self.image_shape
        factor = 2 ** len(self.features)
        if height % factor or width % factor:
            raise ValueError(f"ConvDecoder with {len(self.features)} stages needs H, W divisible by {factor}, "
                             f"got {self.image_shape}")
        # A spatial latent is a grid of H / 2^stages x W / 2^stages; a flat one a vector.
        _checks.expect(self, z, "(batch, height, width, channels)" if self.spatial else "(batch, latent)", "float",
                       "latents")
        if self.spatial:
            h = z
        else:
            h = Dense(height // factor * width // factor * self.features[-1])(z)
            h = einops.rearrange(h, "b (h w c) -> b h w c", h=height // factor, w=width // factor)
        for width_ in reversed(self.features):
            h = nn.relu(nn.Conv(width_, (3, 3))(h))  # no relu before: a spatial latent keeps its sign
            h = nn.relu(nn.ConvTranspose(width_, (3, 3), strides=(2, 2))(h))
        return nn.Conv(channels, (3, 3))(h)


class Autoencoder(nn.Module):
    """encoder -> latent -> decoder; `decode` output is in the decoder's units (logits or values)."""

    encoder: nn.Module
    decoder: nn.Module

    def __call__(self, x):
        return self.decoder(self.encoder(x))

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)


def mlp_autoencoder(image_shape, hidden: Sequence[int] = (64,), latent: int = 8) -> Autoencoder:
    """The BASELINES.md MLP autoencoder: 64 -> 64 -> 8 -> 64 -> 64 on 8x8 digits."""
    return Autoencoder(MLPEncoder(tuple(hidden), latent), MLPDecoder(tuple(reversed(hidden)), tuple(image_shape)))


def conv_autoencoder(image_shape, features: Sequence[int] = (32, 64), latent: int = 16,
                     spatial: bool = False) -> Autoencoder:
    """Strided conv encoder and transposed-conv decoder; `spatial` keeps a latent grid."""
    return Autoencoder(ConvEncoder(tuple(features), latent, spatial),
                       ConvDecoder(tuple(features), tuple(image_shape), spatial))


class VAE(nn.Module):
    """Gaussian posterior q(z|x) = N(mu, diag exp(logvar)), standard normal prior, and a decoder
    that gives Bernoulli logits (`likelihood='bernoulli'`) or Gaussian means with a learned
    global log-scale (`'gaussian'`)."""

    encoder: nn.Module  # -> (B, 2 * latent)
    decoder: nn.Module  # (B, latent) -> (B, H, W, C)
    latent: int
    likelihood: str = "bernoulli"

    def setup(self):
        if self.likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"VAE likelihood must be 'bernoulli' or 'gaussian', got {self.likelihood!r}")
        self.log_scale = self.param("log_scale", nn.initializers.zeros, ())

    def posterior(self, x_BxHxWxC) -> tuple[Float[Array, "B Z"], Float[Array, "B Z"]]:
        """(mean, log-variance) of q(z|x)."""
        stats = self.encoder(x_BxHxWxC)
        if stats.shape[-1] != 2 * self.latent:
            raise ValueError(f"VAE encoder must output 2 * latent = {2 * self.latent} numbers, got {stats.shape}")
        mean_BxZ, logvar_BxZ = jnp.split(stats, 2, axis=-1)
        return mean_BxZ, jnp.clip(logvar_BxZ, -10.0, 10.0)

    def generate(self, z_BxZ):
        """Decoder output for latents: probabilities (Bernoulli) or means (Gaussian) in image space."""
        out = self.decoder(z_BxZ)
        return jax.nn.sigmoid(out) if self.likelihood == "bernoulli" else out

    def log_likelihood(self, x_BxHxWxC, z_BxZ) -> Float[Array, "B"]:
        """log p(x|z) summed over pixels, in nats."""
        out = self.decoder(z_BxZ)
        if self.likelihood == "bernoulli":
            # Continuous targets in [0, 1] are fine: this is the cross-entropy against x.
            ll = x_BxHxWxC * jax.nn.log_sigmoid(out) + (1.0 - x_BxHxWxC) * jax.nn.log_sigmoid(-out)
        else:
            ll = -0.5 * ((x_BxHxWxC - out) / jnp.exp(self.log_scale)) ** 2 - self.log_scale \
                - 0.5 * math.log(2 * math.pi)
        return einops.reduce(ll, "b h w c -> b", "sum")

    def __call__(self, rng: PRNGKeyArray, x_BxHxWxC) -> dict:
        """One-sample ELBO terms per example: reconstruction log p(x|z), KL(q||p), and the reconstruction."""
        mean_BxZ, logvar_BxZ = self.posterior(x_BxHxWxC)
        z_BxZ = reparameterize(rng, mean_BxZ, logvar_BxZ)
        return {"log_likelihood": self.log_likelihood(x_BxHxWxC, z_BxZ),
                "kl": gaussian_kl(mean_BxZ, logvar_BxZ),
                "reconstruction": self.generate(mean_BxZ)}

    def iwae_bound(self, rng: PRNGKeyArray, x_BxHxWxC, num_samples: int) -> Float[Array, "B"]:
        """log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q: a lower bound on log p(x) that is >= the ELBO."""
        mean_BxZ, logvar_BxZ = self.posterior(x_BxHxWxC)
        eps_KxBxZ = jax.random.normal(rng, (num_samples,) + mean_BxZ.shape)
        z_KxBxZ = mean_BxZ + jnp.exp(0.5 * logvar_BxZ) * eps_KxBxZ
        log_q_KxB = gaussian_log_density(z_KxBxZ, mean_BxZ, logvar_BxZ)
        log_prior_KxB = gaussian_log_density(z_KxBxZ, jnp.zeros_like(mean_BxZ), jnp.zeros_like(logvar_BxZ))
        k, b = z_KxBxZ.shape[:2]
        x_KBxHxWxC = jnp.broadcast_to(x_BxHxWxC, (k,) + x_BxHxWxC.shape).reshape((k * b,) + x_BxHxWxC.shape[1:])
        log_lik_KxB = self.log_likelihood(x_KBxHxWxC, z_KxBxZ.reshape(k * b, -1)).reshape(k, b)
        return jax.nn.logsumexp(log_lik_KxB + log_prior_KxB - log_q_KxB, axis=0) - math.log(num_samples)


def reparameterize(rng: PRNGKeyArray, mean_BxZ, logvar_BxZ):
    """z = mean + sigma * eps, differentiable in mean and logvar."""
    return mean_BxZ + jnp.exp(0.5 * logvar_BxZ) * jax.random.normal(rng, mean_BxZ.shape)


def gaussian_kl(mean_BxZ, logvar_BxZ) -> Float[Array, "B"]:
    """KL(N(mean, exp(logvar)) || N(0, I)) in nats, summed over the latent."""
    return 0.5 * jnp.sum(jnp.exp(logvar_BxZ) + mean_BxZ**2 - 1.0 - logvar_BxZ, axis=-1)


def gaussian_log_density(z, mean, logvar) -> jax.Array:
    """log N(z; mean, diag exp(logvar)) summed over the last axis."""
    return -0.5 * jnp.sum((z - mean) ** 2 / jnp.exp(logvar) + logvar + math.log(2 * math.pi), axis=-1)


def mlp_vae(image_shape, hidden: Sequence[int] = (256, 128), latent: int = 8,
            likelihood: str = "bernoulli") -> VAE:
    """MLP encoder/decoder VAE."""
    return VAE(MLPEncoder(tuple(hidden), 2 * latent), MLPDecoder(tuple(reversed(hidden)), tuple(image_shape)),
               latent=latent, likelihood=likelihood)


TinyMLP = functools.partial(mlp_autoencoder, hidden=(8,), latent=2)
