"""Transformers: the pre-norm block, layer stacks (scanned or unrolled), decoder LM, encoder, encoder-decoder.

Shape letters: B batch, L target positions, S source positions, D width, V vocabulary.
Parameters carry logical axis names (embed, mlp, heads, kv, vocab; `layers` for the
stacked axis of a scanned stack), so data / FSDP / tensor parallelism is a config change
(`parallel.rules`). `scan_layers=True` compiles one block and loops over it with
`nn.scan`: compile time stays flat in depth.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxml.models import attention as attention_lib
from jaxml.models import remat as remat_lib
from jaxml.models import _checks
from jaxml.models.attention import MultiHeadAttention, key_padding_mask
from jaxml.models.dense import Dense


def _dense(features: int, names: tuple[str, str], dtype, name: str | None = None, in_scan: bool = False) -> nn.Dense:
    # In a scanned stack the copy jaxml's Dense makes for its kernel gradient becomes a stacked
    # residual of the loop: a scanned 4-layer GPT step took 1.18x as long with it, so plain Dense there.
    return (nn.Dense if in_scan else Dense)(features, dtype=dtype, name=name, kernel_init=nn.with_logical_partitioning(
        nn.initializers.xavier_uniform(), names))


@jax.custom_jvp
def gelu_one_residual(x):
    """`flax.linen.gelu` (tanh approximation), whose backward pass keeps one array: gelu'(x).

    Autodiff of the tanh formula keeps its intermediates (x, x^3, tanh, ...). Unrolled, XLA
    fuses them away; in a scanned stack each becomes a stacked residual of the loop, zero-filled
    and written every step (a scanned 4-layer GPT step 0.91x with this on jax 0.10.2 CPU, 0.92x
    on 0.12.1). Unrolled the plain gelu is faster (the fused recomputation beats storing gelu'),
    so scanned stacks only.
    """
    return nn.gelu(x, approximate=True)


@gelu_one_residual.defjvp
def _gelu_one_residual_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    c = jnp.asarray(np.sqrt(2 / np.pi), x.dtype)
    t = jnp.tanh(c * (x + 0.044715 * x ** 3))
    dydx = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
    return gelu_one_residual(x), dydx * dx


class TransformerBlock(nn.Module):
    """x + attn(LN(x)) [+ cross_attn(LN(x), context)] + mlp(LN(x)), each residual branch with dropout."""

    num_heads: int
    mlp_dim: int
    num_kv_heads: int | None = None
    dropout: float = 0.0  # on each residual branch
    attention_dropout: float = 0.0
    causal: bool = False
    cross_attention: bool = False  # decoder blocks of an encoder-decoder
    use_fused: bool = False
    rope: bool = False
    dtype: Any = jnp.float32
    norm_epsilon: float = 1e-6  # flax's LayerNorm default; GPT-2 uses 1e-5
    in_scan: bool = False  # set by TransformerStack(scan_layers=True): plain Dense and gelu_one_residual in its MLP
    attention_batch_blocks: int | None = None  # MultiHeadAttention.batch_blocks (set by a stack in blocks)

    @nn.compact
    def __call__(self, x_BxLxD: Float[Array, "B L D"], mask_BxLxS: Bool[Array, "B L L"] | None = None,
                 context_BxSxC: Float[Array, "B S C"] | None = None,
                 context_mask_BxLxS: Bool[Array, "B L S"] | None = None, *, train: bool = False,
                 decode: bool = False) -> Float[Array, "B L D"]:
        _checks.expect(self, x_BxLxD, "(batch, length, features)", "float", "activations")
        if self.cross_attention != (context_BxSxC is not None):
            raise ValueError(f"TransformerBlock(cross_attention={self.cross_attention}) got context "
                             f"{None if context_BxSxC is None else context_BxSxC.shape}: a context is "
                             f"needed exactly when cross_attention=True")
        attention = functools.partial(MultiHeadAttention, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                                      dropout=self.attention_dropout, use_fused=self.use_fused, dtype=self.dtype,
                                      batch_blocks=self.attention_batch_blocks)
        drop = nn.Dropout(self.dropout, deterministic=not train)
        h = nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name="norm_attention")(x_BxLxD)
        h = attention(causal=self.causal, rope=self.rope, name="attention")(h, None, mask_BxLxS, train=train,
                                                                             decode=decode)
        x_BxLxD = x_BxLxD + drop(h)
        if self.cross_attention:
            h = nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name="norm_cross")(x_BxLxD)
            h = attention(name="cross_attention")(h, context_BxSxC, context_mask_BxLxS, train=train)
            x_BxLxD = x_BxLxD + drop(h)
        h = nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name="norm_mlp")(x_BxLxD)
        gelu = gelu_one_residual if self.in_scan else nn.gelu
        h = gelu(_dense(self.mlp_dim, ("embed", "mlp"), self.dtype, "mlp_in", self.in_scan)(h))
        h = _dense(x_BxLxD.shape[-1], ("mlp", "embed"), self.dtype, "mlp_out", self.in_scan)(drop(h))
        return x_BxLxD + drop(h)


class _ScanLayer(nn.Module):
    """One block in nn.scan's (carry, x) -> (carry, y) form; train/decode are fields so remat sees them static."""

    block: functools.partial  # TransformerBlock with its hyperparameters bound
    train: bool
    decode: bool

    @nn.compact
    def __call__(self, x_BxLxD, mask_BxLxS, context_BxSxC, context_mask_BxLxS):
        y = self.block(name="block")(x_BxLxD, mask_BxLxS, context_BxSxC, context_mask_BxLxS,
                                     train=self.train, decode=self.decode)
        return y, None


class TransformerStack(nn.Module):
    """`num_layers` TransformerBlocks: one scanned block (params stacked on a `layers` axis) or unrolled."""

    num_layers: int
    block: functools.partial  # TransformerBlock with its hyperparameters bound
    scan_layers: bool = True
    # Activations the backward pass keeps vs recomputes, per block: a jaxml.models.remat policy
    # name ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable") or True / False.
    remat: bool | str = "none"

    @nn.compact
    def __call__(self, x_BxLxD, mask_BxLxS=None, context_BxSxC=None, context_mask_BxLxS=None, *,
                 train: bool = False, decode: bool = False):
        layer = remat_lib.wrap(_ScanLayer, self.remat, scanned=self.scan_layers)
        if self.scan_layers:
            stack = nn.scan(layer, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=self.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x_BxLxD, _ = stack(functools.partial(self.block, in_scan=True), train, decode, name="layers")(
                x_BxLxD, mask_BxLxS, context_BxSxC, context_mask_BxLxS)
            return x_BxLxD
        blocks = 1 if decode else stack_blocks(x_BxLxD.shape[0])
        # In blocks, attention inside runs each block whole (halved again: GPT 1.04x, slower).
        block = self.block if blocks == 1 else functools.partial(self.block, attention_batch_blocks=1)
        layers = [layer(block, train, decode, name=f"layer_{i}") for i in range(self.num_layers)]
        outs = []
        for x, mask, context, context_mask in attention_lib.split_batch(  # each block through every layer
                (x_BxLxD, mask_BxLxS, context_BxSxC, context_mask_BxLxS), blocks):
            for each in layers:
                x, _ = each(x, mask, context, context_mask)
            outs.append(x)
        return outs[0] if blocks == 1 else jnp.concatenate(outs, axis=0)


# The unrolled stack's batch blocks: None picks them (`stack_blocks`); an integer forces that many
# where it divides the batch (tests compare the two forms).
STACK_BLOCKS: int | None = None


def stack_blocks(batch: int) -> int:
    """How many batch blocks an unrolled `TransformerStack` runs through its layers side by side
    (read when a function is traced): 2 on the CPU backend with one device and an even batch of
    16 or more, else 1; never while decoding (the KV cache holds the whole batch).

    Each block goes through every layer with the same parameters (their gradients add up), so
    XLA has two independent chains of small dots and elementwise work to put on two cores. On 2
    cores (2026-12-07), interleaved A/B of the benchmark's engine step (unrolled stacks, as the
    experiments run them): jax 0.12.1 GPT 0.908-0.922x in four runs (CPU time 0.92-0.94x), ViT
    0.992-1.040x in three (a tie); jax 0.10.2, against attention's own batch blocks, GPT
    0.969-0.990x in three, ViT 0.977-0.982x in three; four blocks 0.938x (0.12.1 GPT); the
    attention inside halved again 1.04x (0.10.2 GPT). Scanned stacks keep one block: two scans
    over the layers were slower (GPT 1.07x on 0.12.1, 1.09x on 0.10.2). Dropout draws each
    block's masks separately; a forced count makes the same function apart from that."""
    return attention_lib.resolve_blocks("transformer.STACK_BLOCKS", STACK_BLOCKS, batch, lambda: 2 if (
        attention_lib.one_cpu_device() and batch % 2 == 0 and batch >= 16) else 1)


def _block(cfg, causal: bool, cross_attention: bool, norm_epsilon: float = 1e-6) -> functools.partial:
    return functools.partial(TransformerBlock, num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim,
                             num_kv_heads=cfg.num_kv_heads, dropout=cfg.dropout,
                             attention_dropout=cfg.attention_dropout, causal=causal,
                             cross_attention=cross_attention, use_fused=cfg.use_fused, rope=cfg.rope, dtype=cfg.dtype,
                             norm_epsilon=norm_epsilon)


class _Embedding(nn.Module):
    """Token embedding plus learned positions (unless RoPE); in decode mode positions continue from a counter."""

    vocab_size: int
    features: int
    max_len: int
    learned_positions: bool
    dtype: Any

    @nn.compact
    def __call__(self, tokens_BxL: Int[Array, "B L"], decode: bool = False):
        embed = nn.Embed(self.vocab_size, self.features, name="token", embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")))
        x_BxLxD = embed(tokens_BxL).astype(self.dtype)
        length = tokens_BxL.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len={self.max_len}")
        start = 0
        if decode:
            initialized = self.has_variable("cache", "position")
            position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            if initialized:
                start = position.value
                position.value = start + length
        if self.learned_positions:
            table_PxD = self.param("position", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                            (None, "embed")),
                                   (self.max_len, self.features))
            positions_L = start + jnp.arange(length)
            x_BxLxD = x_BxLxD + jnp.take(table_PxD, positions_L, axis=0).astype(self.dtype)[None]
        return x_BxLxD, embed


class DecoderLM(nn.Module):
    """GPT-style causal LM: embeddings, causal pre-norm stack, final LayerNorm, (tied) unembedding -> float32 logits."""

    vocab_size: int
    num_layers: int = 4
    features: int = 128
    num_heads: int = 4
    mlp_dim: int = 512
    max_len: int = 256
    num_kv_heads: int | None = None
    dropout: float = 0.0
    attention_dropout: float = 0.0
    tied_embedding: bool = True
    scan_layers: bool = True
    remat: bool | str = "none"  # a jaxml.models.remat policy for each block
    use_fused: bool = False
    rope: bool = False
    dtype: Any = jnp.float32
    norm_epsilon: float = 1e-6  # LayerNorm epsilon; 1e-5 matches GPT-2 (jaxml.models.gpt2)

    @nn.compact
    def __call__(self, tokens_BxL: Int[Array, "B L"], *, train: bool = False,
                 decode: bool = False) -> Float[Array, "B L V"]:
        _checks.expect(self, tokens_BxL, "(batch, length)", "int", "tokens")
        x_BxLxD, embed = _Embedding(self.vocab_size, self.features, self.max_len, not self.rope, self.dtype,
                                    name="embed")(tokens_BxL, decode)
        x_BxLxD = nn.Dropout(self.dropout, deterministic=not train)(x_BxLxD)
        x_BxLxD = TransformerStack(self.num_layers, _block(self, causal=True, cross_attention=False,
                                                           norm_epsilon=self.norm_epsilon),
                                   self.scan_layers, self.remat, name="decoder")(x_BxLxD, train=train, decode=decode)
        x_BxLxD = nn.LayerNorm(epsilon=self.norm_epsilon, dtype=self.dtype, name="norm_final")(x_BxLxD)
        if self.tied_embedding:
            logits_BxLxV = embed.attend(x_BxLxD)
        else:
            logits_BxLxV = _dense(self.vocab_size, ("embed", "vocab"), self.dtype, "unembed")(x_BxLxD)
        return logits_BxLxV.astype(jnp.float32)


class Encoder(nn.Module):
    """Bidirectional pre-norm stack over tokens; padding positions (valid=False) are never attended to."""

    vocab_size: int
    num_layers: int = 2
    features: int = 128
    num_heads: int = 4
    mlp_dim: int = 512
    max_len: int = 256
    num_kv_heads: int | None = None
    dropout: float = 0.0
    attention_dropout: float = 0.0
    scan_layers: bool = True
    remat: bool | str = "none"  # a jaxml.models.remat policy for each block
    use_fused: bool = False
    rope: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens_BxS: Int[Array, "B S"], valid_BxS: Bool[Array, "B S"] | None = None, *,
                 train: bool = False) -> Float[Array, "B S D"]:
        _checks.expect(self, tokens_BxS, "(batch, source)", "int", "tokens")
        if valid_BxS is not None:
            _checks.expect(self, valid_BxS, "(batch, source)", "bool", "valid mask",
                           {"batch": tokens_BxS.shape[0], "source": tokens_BxS.shape[1]})
        x_BxSxD, _ = _Embedding(self.vocab_size, self.features, self.max_len, not self.rope, self.dtype,
                                name="embed")(tokens_BxS)
        x_BxSxD = nn.Dropout(self.dropout, deterministic=not train)(x_BxSxD)
        mask_BxSxS = None if valid_BxS is None else key_padding_mask(valid_BxS, tokens_BxS.shape[1])
        x_BxSxD = TransformerStack(self.num_layers, _block(self, causal=False, cross_attention=False),
                                   self.scan_layers, self.remat, name="encoder")(x_BxSxD, mask_BxSxS, train=train)
        return nn.LayerNorm(dtype=self.dtype, name="norm_final")(x_BxSxD)


class EncoderDecoder(nn.Module):
    """Transformer encoder-decoder (Vaswani et al. 2017, pre-norm): shared vocabulary, tied decoder unembedding."""

    vocab_size: int
    num_layers: int = 2  # each of encoder and decoder
    features: int = 128
    num_heads: int = 4
    mlp_dim: int = 512
    max_len: int = 64
    num_kv_heads: int | None = None
    dropout: float = 0.0
    attention_dropout: float = 0.0
    scan_layers: bool = True
    remat: bool | str = "none"  # a jaxml.models.remat policy for each block
    use_fused: bool = False
    rope: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        fields = dict(vocab_size=self.vocab_size, num_layers=self.num_layers, features=self.features,
                      num_heads=self.num_heads, mlp_dim=self.mlp_dim, max_len=self.max_len,
                      num_kv_heads=self.num_kv_heads, dropout=self.dropout, attention_dropout=self.attention_dropout,
                      scan_layers=self.scan_layers, remat=self.remat, use_fused=self.use_fused, rope=self.rope,
                      dtype=self.dtype)
        self.encoder = Encoder(**fields)
        self.target_embed = _Embedding(self.vocab_size, self.features, self.max_len, not self.rope, self.dtype)
        self.decoder = TransformerStack(self.num_layers, _block(self, causal=True, cross_attention=True),
                                        self.scan_layers, self.remat)
        self.norm_final = nn.LayerNorm(dtype=self.dtype)
        self.drop = nn.Dropout(self.dropout)

    def encode(self, source_BxS, source_valid_BxS=None, *, train: bool = False) -> Float[Array, "B S D"]:
        """The encoder's output, to be passed to `decode` (once per sequence when sampling)."""
        return self.encoder(source_BxS, source_valid_BxS, train=train)

    def decode(self, target_BxL, encoded_BxSxD, source_valid_BxS=None, *, train: bool = False,
               decode: bool = False) -> Float[Array, "B L V"]:
        """Next-token logits for the (shifted) target given the encoded source."""
        _checks.expect(self, target_BxL, "(batch, length)", "int", "target tokens")
        _checks.expect(self, encoded_BxSxD, "(batch, source, features)", "float", "encoded source",
                       {"batch": target_BxL.shape[0], "features": self.features})
        if source_valid_BxS is not None:
            _checks.expect(self, source_valid_BxS, "(batch, source)", "bool", "source valid mask",
                           {"batch": target_BxL.shape[0], "source": encoded_BxSxD.shape[1]})
        x_BxLxD, embed = self.target_embed(target_BxL, decode)
        x_BxLxD = self.drop(x_BxLxD, deterministic=not train)
        context_mask = None if source_valid_BxS is None else key_padding_mask(source_valid_BxS, target_BxL.shape[1])
        x_BxLxD = self.decoder(x_BxLxD, None, encoded_BxSxD, context_mask, train=train, decode=decode)
        return embed.attend(self.norm_final(x_BxLxD)).astype(jnp.float32)

    def __call__(self, source_BxS, target_BxL, source_valid_BxS=None, *, train: bool = False) -> Float[Array, "B L V"]:
        _checks.expect(self, source_BxS, "(batch, source)", "int", "source tokens")
        _checks.expect(self, target_BxL, "(batch, length)", "int", "target tokens", {"batch": source_BxS.shape[0]})
        return self.decode(target_BxL, self.encode(source_BxS, source_valid_BxS, train=train), source_valid_BxS,
                           train=train)


Tiny = functools.partial(DecoderLM, num_layers=2, features=32, num_heads=4, mlp_dim=64, max_len=32)
CharGPT = functools.partial(DecoderLM, num_layers=4, features=128, num_heads=4, mlp_dim=512, max_len=64)
NanoGPTShakespeare = functools.partial(DecoderLM, num_layers=6, features=384, num_heads=6, mlp_dim=1536,
                                       max_len=256, dropout=0.2)
GPT2Small = functools.partial(DecoderLM, vocab_size=50304, num_layers=12, features=768, num_heads=12,
                              mlp_dim=3072, max_len=1024)
