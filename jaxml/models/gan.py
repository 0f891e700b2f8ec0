"""DCGAN (Radford et al. 2016): a transposed-conv generator with BatchNorm and ReLU, and a
strided-conv discriminator with LeakyReLU. Images are (B, H, W, C) in [-1, 1] (tanh output).
"""

import functools
from typing import Sequence

import einops
import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxml.models import _checks
from jaxml.models.dense import Dense
from jaxml.models.norm import BatchNorm
from jaxml.train import parallel


class Generator(nn.Module):
    """z -> dense to an (H/2^n, W/2^n, features[0]) grid -> n x (2x transposed conv, BN, ReLU) -> conv, tanh."""

    image_shape: tuple[int, int, int]
    features: Sequence[int] = (128, 64)  # channels of the grids, coarsest first; one upsampling each

    @nn.compact
    def __call__(self, z_BxZ: Float[Array, "B Z"], train: bool) -> Float[Array, "B H W C"]:
        _checks.expect(self, z_BxZ, "(batch, latent)", "float", "latents")
        height, width, channels = self.image_shape
        factor = 2 ** len(self.features)
        if height % factor or width % factor:
            raise ValueError(f"Generator with {len(self.features)} upsamplings needs H, W divisible by {factor}, "
                             f"got {self.image_shape}")
        norm = functools.partial(BatchNorm, use_running_average=not train, momentum=0.9,
                                 axis_name=parallel.pmap_axis_name())
        h = Dense(height // factor * width // factor * self.features[0], use_bias=False)(z_BxZ)
        h = einops.rearrange(h, "b (h w c) -> b h w c", h=height // factor, w=width // factor)
        h = nn.relu(norm()(h))
        for width_ in self.features:
            h = nn.ConvTranspose(width_, (4, 4), strides=(2, 2), use_bias=False)(h)
            h = nn.relu(norm()(h))
        return jnp.tanh(nn.Conv(channels, (3, 3))(h))


class Discriminator(nn.Module):
    """n x (stride-2 conv, LeakyReLU 0.2) -> [minibatch stddev] -> dense to one logit (real vs
    fake); no BatchNorm, so real and fake batches never share statistics."""

    features: Sequence[int] = (64, 128)
    # Karras et al. 2018: one extra channel holding the batch's mean feature std lets D see a
    # batch that lacks variety (a collapsed G) and so pushes G towards diverse samples.
    minibatch_std: bool = False

    @nn.compact
    def __call__(self, x_BxHxWxC: Float[Array, "B H W C"]) -> Float[Array, "B"]:
        _checks.expect(self, x_BxHxWxC, "(batch, height, width, channels)", "float", "images")
        h = x_BxHxWxC
        for width in self.features:
            h = nn.leaky_relu(nn.Conv(width, (4, 4), strides=(2, 2))(h), 0.2)
        if self.minibatch_std:
            h = jnp.concatenate([h, minibatch_stddev(h)], axis=-1)
        return Dense(1)(einops.rearrange(h, "b h w c -> b (h w c)"))[:, 0]


def minibatch_stddev(h_BxHxWxC: Float[Array, "B H W C"]) -> Float[Array, "B H W 1"]:
    """The std over the batch of every feature, averaged to one number, as a constant channel."""
    std = jnp.sqrt(jnp.var(h_BxHxWxC, axis=0) + 1e-8).mean()
    return jnp.broadcast_to(std, h_BxHxWxC.shape[:-1] + (1,))


TinyGenerator = functools.partial(Generator, features=(8,))
TinyDiscriminator = functools.partial(Discriminator, features=(8,))
