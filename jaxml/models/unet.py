"""Diffusion U-Net: sinusoidal time embedding, GroupNorm residual blocks with time/class
conditioning, self-attention at chosen resolutions, optional cross-attention to a
conditioning sequence, skip connections and configurable channel multipliers.
`dtype` is the compute dtype (bfloat16 on accelerators): parameters stay float32, the output
is float32 for the loss; `remat` picks a jaxml.models.remat policy for the residual blocks.

Attention is `jaxml.models.attention.MultiHeadAttention`, the project's one implementation.
"""

import functools
import math
from typing import Sequence

import itertools
from typing import Any

import einops
import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxml.models import remat as remat_lib
from jaxml.models import _checks
from jaxml.models.attention import MultiHeadAttention
from jaxml.models.dense import Dense


def timestep_embedding(t_B: Int[Array, "B"], dim: int, max_period: float = 10_000.0) -> Float[Array, "B D"]:
    """Sinusoidal embedding of integer noise levels (Transformer positions), [cos | sin] halves."""
    if dim % 2:
        raise ValueError(f"timestep embedding dim must be even, got {dim}")
    half = dim // 2
    freqs_H = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args_BxH = t_B.astype(jnp.float32)[:, None] * freqs_H[None, :]
    return jnp.concatenate([jnp.cos(args_BxH), jnp.sin(args_BxH)], axis=-1)


class ResBlock(nn.Module):
    """GroupNorm-swish-conv twice, the embedding added in between as a per-channel shift."""

    features: int
    groups: int = 8
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWxC, emb_BxE, train: bool):
        conv = functools.partial(nn.Conv, self.features, (3, 3), dtype=self.dtype)
        norm = functools.partial(nn.GroupNorm, self.groups, dtype=self.dtype)  # statistics in float32
        h = conv()(nn.swish(norm()(x_BxHxWxC)))
        h = h + Dense(self.features, dtype=self.dtype)(nn.swish(emb_BxE))[:, None, None, :]
        h = nn.swish(norm()(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        # Zero-init last conv: each block starts as the identity, which trains deep U-Nets stably.
        h = conv(kernel_init=nn.initializers.zeros)(h)
        skip = (x_BxHxWxC if x_BxHxWxC.shape[-1] == self.features
                else Dense(self.features, dtype=self.dtype)(x_BxHxWxC))
        return skip + h


class AttentionBlock(nn.Module):
    """Pre-norm self-attention over the H*W positions, then cross-attention to `context` if given."""

    num_heads: int
    groups: int = 8
    dtype: Any = jnp.float32  # compute dtype; attention logits and softmax stay float32

    @nn.compact
    def __call__(self, x_BxHxWxC, context_BxSxD=None):
        _, height, width, _ = x_BxHxWxC.shape
        attention = functools.partial(MultiHeadAttention, num_heads=self.num_heads, dtype=self.dtype)
        norm = functools.partial(nn.LayerNorm, dtype=self.dtype)
        x_BxLxC = einops.rearrange(x_BxHxWxC, "b h w c -> b (h w) c")
        x_BxLxC = x_BxLxC + attention()(norm()(x_BxLxC))
        if context_BxSxD is not None:
            # MultiHeadAttention projects the context's own width D to keys and values.
            x_BxLxC = x_BxLxC + attention()(norm()(x_BxLxC), context_BxSxD.astype(self.dtype))
        return einops.rearrange(x_BxLxC, "b (h w) c -> b h w c", h=height, w=width)


class UNet(nn.Module):
    """eps/x0/v-predicting U-Net; `num_classes` adds a class embedding whose extra index
    `num_classes` means "no class" (classifier-free guidance); `context_dim` enables cross-attention."""

    channels: int = 64
    channel_mults: Sequence[int] = (1, 2)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (4,)  # spatial sizes (H) that get attention
    num_heads: int = 4
    num_classes: int | None = None
    context_dim: int | None = None
    dropout: float = 0.0
    groups: int = 8
    dtype: Any = jnp.float32  # compute dtype; params stay float32, the output is float32
    remat: bool | str = "none"  # a jaxml.models.remat policy for each residual block

    @nn.compact
    def __call__(self, x_BxHxWxC: Float[Array, "B H W C"], t_B: Int[Array, "B"],
                 labels_B: Int[Array, "B"] | None = None, context_BxSxD: Float[Array, "B S D"] | None = None,
                 train: bool = False) -> Float[Array, "B H W C"]:
        _checks.expect(self, x_BxHxWxC, "(batch, height, width, channels)", "float", "images")
        batch, height, width, in_channels = x_BxHxWxC.shape
        _checks.expect(self, t_B, "(batch,)", "real", "noise levels t", {"batch": batch})
        levels = len(self.channel_mults)
        if height % 2 ** (levels - 1) or width % 2 ** (levels - 1):
            raise ValueError(f"UNet with {levels} resolutions needs H and W divisible by {2 ** (levels - 1)}, "
                             f"got {(height, width)}")
        if (labels_B is None) != (self.num_classes is None):
            raise ValueError(f"UNet(num_classes={self.num_classes}) needs labels exactly when num_classes is set, "
                             f"got labels={'None' if labels_B is None else labels_B.shape}")
        if (context_BxSxD is None) != (self.context_dim is None):
            raise ValueError(f"UNet(context_dim={self.context_dim}) needs a context exactly when context_dim is "
                             f"set, got context={'None' if context_BxSxD is None else context_BxSxD.shape}")
        if labels_B is not None:
            _checks.expect(self, labels_B, "(batch,)", "int", "class labels", {"batch": batch})
        if context_BxSxD is not None:
            _checks.expect(self, context_BxSxD, "(batch, positions, context_dim)", "float", "context",
                           {"batch": batch, "context_dim": self.context_dim})
        emb_dim = 4 * self.channels
        dense = functools.partial(Dense, emb_dim, dtype=self.dtype)
        emb_BxE = timestep_embedding(t_B, self.channels)
        emb_BxE = dense()(nn.swish(dense()(emb_BxE)))
        if self.num_classes is not None:
            emb_BxE = emb_BxE + nn.Embed(self.num_classes + 1, emb_dim, dtype=self.dtype)(labels_B)
        # `train` (argument 3, self counting as 0) is a Python bool: static under remat. Blocks
        # are named as Flax names plain ResBlocks, so every remat policy has the same parameters.
        block = remat_lib.wrap(ResBlock, self.remat, static_argnums=(3,))
        numbers = itertools.count()
        res = lambda features: block(features, groups=self.groups, dropout=self.dropout, dtype=self.dtype,
                                     name=f"ResBlock_{next(numbers)}")
        attn = functools.partial(AttentionBlock, num_heads=self.num_heads, groups=self.groups, dtype=self.dtype)
        conv = functools.partial(nn.Conv, kernel_size=(3, 3), dtype=self.dtype)

        h = conv(self.channels)(x_BxHxWxC.astype(self.dtype))
        skips = [h]
        for level, mult in enumerate(self.channel_mults):
            for _ in range(self.num_res_blocks):
                h = res(self.channels * mult)(h, emb_BxE, train)
                if h.shape[1] in self.attention_resolutions:
                    h = attn()(h, context_BxSxD)
                skips.append(h)
            if level < levels - 1:
                h = conv(h.shape[-1], strides=(2, 2))(h)
                skips.append(h)
        h = res(h.shape[-1])(h, emb_BxE, train)
        h = attn()(h, context_BxSxD)
        h = res(h.shape[-1])(h, emb_BxE, train)
        for level, mult in reversed(list(enumerate(self.channel_mults))):
            for _ in range(self.num_res_blocks + 1):
                h = res(self.channels * mult)(jnp.concatenate([h, skips.pop()], axis=-1), emb_BxE, train)
                if h.shape[1] in self.attention_resolutions:
                    h = attn()(h, context_BxSxD)
            if level > 0:
                b, hh, ww, c = h.shape
                h = conv(c)(jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2))  # nearest 2x up
        assert not skips, len(skips)
        h = nn.swish(nn.GroupNorm(self.groups, dtype=self.dtype)(h))
        # Zero-init output: the untrained model predicts 0, a safe start for every target.
        return conv(in_channels, kernel_init=nn.initializers.zeros)(h).astype(jnp.float32)


Tiny = functools.partial(UNet, channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                         num_heads=2, groups=4)
