"""Vision Transformer (Dosovitskiy et al. 2021): patches -> linear embedding -> pre-norm encoder blocks -> head.

Shape letters: B batch, H W C image, P patch side, N patches, D width, K classes. The
blocks are jaxml.models.transformer's TransformerBlock, the same ones the text encoder uses.
"""

import functools
from typing import Any

import einops
import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxml.models import _checks, transformer
from jaxml.models.dense import Dense


class ViT(nn.Module):
    """Patch embedding, class token or mean pooling, learned positions, TransformerStack, LayerNorm, linear head."""

    num_classes: int
    patch_size: int = 4
    num_layers: int = 4
    features: int = 128
    num_heads: int = 4
    mlp_dim: int = 256
    dropout: float = 0.0
    pool: str = "cls"  # cls | mean
    scan_layers: bool = True
    use_fused: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images_BxHxWxC: Float[Array, "B H W C"], *, train: bool = False) -> Float[Array, "B K"]:
        _checks.expect(self, images_BxHxWxC, "(batch, height, width, channels)", "float", "images")
        _, height, width, _ = images_BxHxWxC.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"ViT: image size {(height, width)} must be a multiple of patch_size={p}")
        patches_BxNxF = einops.rearrange(images_BxHxWxC, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=p, p2=p)
        x_BxNxD = Dense(self.features, dtype=self.dtype, name="patch_embed", kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (None, "embed")))(patches_BxNxF.astype(self.dtype))
        if self.pool == "cls":
            cls_1x1xD = self.param("cls", nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, None, "embed")),
                                   (1, 1, self.features))
            x_BxNxD = jnp.concatenate([jnp.broadcast_to(cls_1x1xD, (x_BxNxD.shape[0], 1, self.features)).astype(self.dtype),
                                       x_BxNxD], axis=1)
        elif self.pool != "mean":
            raise ValueError(f"ViT: pool must be 'cls' or 'mean', got {self.pool!r}")
        positions_1xNxD = self.param("position", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                              (None, None, "embed")),
                                     (1,) + x_BxNxD.shape[1:])
        x_BxNxD = nn.Dropout(self.dropout, deterministic=not train)(x_BxNxD + positions_1xNxD.astype(self.dtype))
        block = functools.partial(transformer.TransformerBlock, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                                  dropout=self.dropout, use_fused=self.use_fused, dtype=self.dtype)
        x_BxNxD = transformer.TransformerStack(self.num_layers, block, self.scan_layers, name="encoder")(x_BxNxD,
                                                                                                       train=train)
        x_BxNxD = nn.LayerNorm(dtype=self.dtype, name="norm_final")(x_BxNxD)
        pooled_BxD = x_BxNxD[:, 0] if self.pool == "cls" else x_BxNxD.mean(axis=1)
        return Dense(self.num_classes, dtype=self.dtype, name="head", kernel_init=nn.initializers.zeros_init())(
            pooled_BxD).astype(jnp.float32)


Small = functools.partial(ViT, patch_size=4, num_layers=4, features=128, num_heads=4, mlp_dim=256)
Tiny = functools.partial(ViT, patch_size=4, num_layers=1, features=16, num_heads=2, mlp_dim=32)
