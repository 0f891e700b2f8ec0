"""Multi-head attention (self and cross, grouped-query, RoPE, KV cache) and its masks.

Shape letters: B batch, L query positions, S key positions, N query heads, G key/value
heads (N = G * R), H head dim, D model width. Masks are boolean, True where a query may
attend to a key. The einsum path is the reference; `use_fused` calls
`jax.nn.dot_product_attention` (cuDNN/flash kernels on GPU) and must agree with it.
"""

import functools
from collections.abc import Callable
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from jaxml import runtime
from jaxml.models import _checks

_NEG = jnp.finfo(jnp.float32).min  # finite, so a fully masked row gives uniform weights, not NaN


def causal_mask(length: int) -> Bool[Array, "L L"]:
    """True on and below the diagonal: position l sees positions <= l."""
    return jnp.tril(jnp.ones((length, length), bool))


def key_padding_mask(valid_BxS: Bool[Array, "B S"], query_length: int) -> Bool[Array, "B L S"]:
    """Queries may attend only to real (valid) keys."""
    return jnp.broadcast_to(valid_BxS[:, None, :], (valid_BxS.shape[0], query_length, valid_BxS.shape[1]))


def apply_rope(x_BxLxNxH: Float[Array, "B L N H"], positions_L: Array, base: float = 10000.0) -> Array:
    """Rotary position embedding (Su et al. 2021), rotating the two halves of each head."""
    head_dim = x_BxLxNxH.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rope needs an even head dim, got {head_dim}")
    half = head_dim // 2
    freq_F = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_LxF = positions_L.astype(jnp.float32)[:, None] * freq_F[None, :]
    sin_1xLx1xF, cos_1xLx1xF = jnp.sin(angle_LxF)[None, :, None], jnp.cos(angle_LxF)[None, :, None]
    x1, x2 = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos_1xLx1xF - x2 * sin_1xLx1xF, x2 * cos_1xLx1xF + x1 * sin_1xLx1xF], -1)
    return out.astype(x_BxLxNxH.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def softmax(x, axis: int = -1):
    """`jax.nn.softmax` whose derivative keeps only its output y: dy = y (dx - sum(y dx)).

    jax 0.12 computes softmax this way by default (`jax_softmax_custom_jvp`); jax 0.10.2
    does not, and differentiates exp / sum, keeping the logits, exp(logits) and 1/sum^2 for
    the backward pass besides the weights. With this the attention step on jax 0.10.2 CPU:
    ViT 0.90x, GPT 0.95x (interleaved A/B of the engine step); on 0.12.1 it is what JAX does.
    """
    return jax.nn.softmax(x, axis=axis)


@softmax.defjvp
def _softmax_jvp(axis, primals, tangents):
    (x,), (dx,) = primals, tangents
    y = softmax(x, axis)
    return y, y * (dx - jnp.sum(y * dx, axis=axis, keepdims=True))


# The einsum path's batch blocks: None picks them by backend and jaxlib (`batch_blocks`); an
# integer forces that many where it divides the batch (tests compare the two forms).
BATCH_BLOCKS: int | None = None


def resolve_blocks(setting: str, forced: int | None, batch: int, auto: Callable[[], int]) -> int:
    """The batch blocks a function computes side by side: `forced` (a module's `*_BLOCKS`
    setting) where it divides `batch`, else 1; `auto()` when `forced` is None. Blocks are a
    speed setting, never a function change, so a batch they do not divide runs as one."""
    if forced is None:
        return auto()
    if isinstance(forced, bool) or not isinstance(forced, int) or forced < 1:
        raise ValueError(f"{setting} must be None or a positive integer, got {forced!r}")
    return forced if batch % forced == 0 else 1


def one_cpu_device() -> bool:
    """True on the CPU backend with one device: there a batch can be split in blocks freely
    (with several devices a contiguous half of a sharded batch would move rows between them)."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1


def batch_blocks(batch: int) -> int:
    """How many batch blocks `dot_product_attention` computes side by side (read when a function
    is traced): 2 on jaxlib < 0.11's CPU backend with one device and an even batch, else 1.

    There YNNPACK runs each batched attention dot (the GPT's 32 x 4 heads of 64 x 32 x 64) on
    one thread while the other core idles; two independent half-batch dots let XLA run them on
    both. Interleaved A/B of the engine step (2 cores, jax 0.10.2): GPT 0.974x, 0.972x, ViT
    0.975x, the U-Net 0.983x (its attention at 4x4); four blocks were slower (GPT 1.046x, ViT
    1.031x); on jax 0.12.1 GPT 0.993x, ViT 1.011x, so not there. Several devices keep one block:
    a contiguous half of a batch sharded over them would move rows between devices. Inside an
    unrolled `transformer.TransformerStack` that runs in batch blocks itself, one block."""
    return resolve_blocks("attention.BATCH_BLOCKS", BATCH_BLOCKS, batch, lambda: 2 if (
        runtime.jaxlib_version() < (0, 11) and one_cpu_device() and batch % 2 == 0) else 1)


def dot_product_attention(q_BxLxNxH, k_BxSxGxH, v_BxSxGxH, mask_BxLxS, *, dropout_rng=None,
                          dropout: float = 0.0, blocks: int | None = None) -> Float[Array, "B L N H"]:
    """softmax(q k^T / sqrt(H)) v with grouped-query heads; logits and softmax in float32.
    On jaxlib 0.10's CPU the batch runs as two blocks side by side (`batch_blocks`; `blocks`
    overrides it), except with attention-weight dropout (whose mask is drawn for the whole
    batch): the same function."""
    if dropout > 0.0 and dropout_rng is not None:
        blocks = 1
    elif blocks is None:
        blocks = batch_blocks(q_BxLxNxH.shape[0])
    if blocks == 1:
        return _attention(q_BxLxNxH, k_BxSxGxH, v_BxSxGxH, mask_BxLxS, dropout_rng=dropout_rng, dropout=dropout)
    parts = split_batch((q_BxLxNxH, k_BxSxGxH, v_BxSxGxH, mask_BxLxS), blocks)
    return jnp.concatenate([_attention(q, k, v, m) for q, k, v, m in parts], axis=0)


def split_batch(arrays, blocks: int) -> list[tuple]:
    """`blocks` tuples of `arrays` (each None, batch-sized or broadcast over the batch), the
    batch-sized ones cut into contiguous blocks along axis 0 (the first array's batch), the
    others passed whole to every block."""
    whole = arrays[0].shape[0]
    parts = [jnp.split(a, blocks, axis=0) if a is not None and a.shape[0] == whole else [a] * blocks
             for a in arrays]
    return list(zip(*parts))


def _attention(q_BxLxNxH, k_BxSxGxH, v_BxSxGxH, mask_BxLxS, *, dropout_rng=None,
               dropout: float = 0.0) -> Float[Array, "B L N H"]:
    groups = k_BxSxGxH.shape[2]
    q_BxLxGxRxH = einops.rearrange(q_BxLxNxH, "b l (g r) h -> b l g r h", g=groups)
    scale = q_BxLxNxH.shape[-1] ** -0.5
    logits_BxGxRxLxS = jnp.einsum("blgrh,bsgh->bgrls", q_BxLxGxRxH * scale, k_BxSxGxH,
                                  preferred_element_type=jnp.float32)
    if mask_BxLxS is not None:
        logits_BxGxRxLxS = jnp.where(mask_BxLxS[:, None, None], logits_BxGxRxLxS, _NEG)
    weights = softmax(logits_BxGxRxLxS, axis=-1)
    if dropout > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout), 0.0)
    out_BxLxGxRxH = jnp.einsum("bgrls,bsgh->blgrh", weights.astype(v_BxSxGxH.dtype), v_BxSxGxH)
    return einops.rearrange(out_BxLxGxRxH, "b l g r h -> b l (g r) h")


class MultiHeadAttention(nn.Module):
    """Self-attention over `x`, or cross-attention from `x` to `context`; output has x's width.

    `mask_BxLxS` (True = may attend) combines with the causal mask. With `decode=True` a
    causal self-attention keeps its keys and values in the "cache" collection: the first
    call (at init) sizes the cache from its input length; each later call appends its L
    positions at `cache_index` and attends to everything cached so far.
    """

    num_heads: int
    num_kv_heads: int | None = None  # grouped-query attention; None = num_heads
    head_dim: int | None = None  # None = features // num_heads
    dropout: float = 0.0  # on the attention weights (einsum path only)
    causal: bool = False
    use_fused: bool = False
    rope: bool = False  # rotary positions on self-attention queries and keys
    dtype: Any = jnp.float32  # compute dtype; logits and softmax stay float32
    batch_blocks: int | None = None  # the einsum path's batch blocks; None: `batch_blocks`'s rule

    @nn.compact
    def __call__(self, x_BxLxD: Float[Array, "B L D"], context_BxSxC: Float[Array, "B S C"] | None = None,
                 mask_BxLxS: Bool[Array, "B L S"] | None = None, *, train: bool = False,
                 decode: bool = False) -> Float[Array, "B L D"]:
        _checks.expect(self, x_BxLxD, "(batch, length, features)", "float", "queries")
        batch, length, features = x_BxLxD.shape
        if context_BxSxC is not None:
            _checks.expect(self, context_BxSxC, "(batch, source, features)", "float", "context", {"batch": batch})
        self_attention = context_BxSxC is None
        context_BxSxC = x_BxLxD if self_attention else context_BxSxC
        if mask_BxLxS is not None:
            _checks.expect(self, mask_BxLxS, "(batch, length, source)", "bool", "mask",
                           {"batch": batch, "length": length, "source": context_BxSxC.shape[1]})
        heads = self.num_heads
        kv_heads = self.num_kv_heads or heads
        head_dim = self.head_dim or features // heads
        if heads % kv_heads or (self.head_dim is None and features % heads):
            raise ValueError(f"MultiHeadAttention: num_heads={heads} must be a multiple of num_kv_heads="
                             f"{kv_heads}, and (without head_dim) divide the width {features}")
        if decode and self_attention and not self.causal:
            raise ValueError("decode=True needs causal=True: a KV cache only makes sense for causal "
                             "self-attention (cross-attention ignores decode and recomputes its keys)")

        def project(name, n, inputs):
            # No key bias: it adds q.b to every logit of a row, which softmax cancels, so its gradient
            # is exactly zero and Adam would only amplify rounding noise in it.
            return nn.DenseGeneral((n, head_dim), dtype=self.dtype, name=name, use_bias=name != "key",
                                   kernel_init=nn.with_logical_partitioning(
                                       nn.initializers.lecun_normal(), ("embed", "heads", "kv")))(inputs)

        q_BxLxNxH = project("query", heads, x_BxLxD)
        k_BxSxGxH = project("key", kv_heads, context_BxSxC)
        v_BxSxGxH = project("value", kv_heads, context_BxSxC)

        causal = self.causal and self_attention
        use_cache = decode and self_attention and self.has_variable("cache", "cached_key")
        if decode and self_attention:
            cached_k = self.variable("cache", "cached_key", jnp.zeros, k_BxSxGxH.shape, k_BxSxGxH.dtype)
            cached_v = self.variable("cache", "cached_value", jnp.zeros, v_BxSxGxH.shape, v_BxSxGxH.dtype)
            cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if use_cache:
            start = cache_index.value
            positions_L = start + jnp.arange(length)
            if self.rope:
                q_BxLxNxH, k_BxSxGxH = apply_rope(q_BxLxNxH, positions_L), apply_rope(k_BxSxGxH, positions_L)
            cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k_BxSxGxH, (0, start, 0, 0))
            cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v_BxSxGxH, (0, start, 0, 0))
            cache_index.value = start + length
            k_BxSxGxH, v_BxSxGxH = cached_k.value, cached_v.value
            # Causal over absolute positions; it also hides the cache slots not written yet.
            visible_LxS = jnp.arange(k_BxSxGxH.shape[1])[None, :] <= positions_L[:, None]
            if mask_BxLxS is not None and mask_BxLxS.shape[2] != k_BxSxGxH.shape[1]:
                raise ValueError(f"decode: the mask's key axis must span the cache ({k_BxSxGxH.shape[1]}), "
                                 f"got {mask_BxLxS.shape}")
        else:
            if self.rope and self_attention:
                positions_L = jnp.arange(length)
                q_BxLxNxH, k_BxSxGxH = apply_rope(q_BxLxNxH, positions_L), apply_rope(k_BxSxGxH, positions_L)
            visible_LxS = causal_mask(length) if causal else None
        mask = mask_BxLxS
        if visible_LxS is not None:
            mask = visible_LxS[None] if mask is None else mask & visible_LxS[None]
            mask = jnp.broadcast_to(mask, (batch,) + visible_LxS.shape)

        dropout_rng = self.make_rng("dropout") if train and self.dropout > 0.0 else None
        if self.use_fused:
            if dropout_rng is not None:
                raise ValueError("use_fused=True has no attention-weight dropout: set dropout=0.0 or use_fused=False")
            out_BxLxNxH = jax.nn.dot_product_attention(
                q_BxLxNxH, k_BxSxGxH, v_BxSxGxH, mask=None if mask is None else mask[:, None])
        else:
            out_BxLxNxH = dot_product_attention(q_BxLxNxH, k_BxSxGxH, v_BxSxGxH, mask, dropout_rng=dropout_rng,
                                                dropout=self.dropout, blocks=self.batch_blocks)
        return nn.DenseGeneral(features, axis=(-2, -1), dtype=self.dtype, name="out",
                               kernel_init=nn.with_logical_partitioning(
                                   nn.initializers.lecun_normal(), ("heads", "kv", "embed")))(out_BxLxNxH)
