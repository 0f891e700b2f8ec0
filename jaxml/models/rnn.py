"""Recurrent networks: fused LSTM and GRU cells, stacked (optionally bidirectional) layers, LM and classifier heads.

Shape letters: B batch, T time, C input features, H hidden, V vocabulary, K classes.
The cells compute the same function as Flax's `nn.LSTMCell` / `nn.GRUCell` but with one
matmul per input and per state for all gates (faster on every backend); `nn.RNN` scans
them over time, and `seq_lengths` keeps padding out of the state (and reverses only the
real steps for the backward direction).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxml.models import _checks
from jaxml.models.dense import Dense


class LSTMCell(nn.RNNCellBase):
    """i, f, g, o = split(x W_x + h W_h + b); c' = f c + i g; h' = o tanh(c')."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry, x_BxC):
        c_BxH, h_BxH = carry
        w_x = self.param("input_kernel", nn.initializers.lecun_normal(), (x_BxC.shape[-1], 4 * self.features))
        # Orthogonal per gate, as Flax initialises each gate's recurrent kernel.
        w_h = self.param("recurrent_kernel", _per_gate(nn.initializers.orthogonal(), 4), (self.features, 4 * self.features))
        b = self.param("bias", nn.initializers.zeros_init(), (4 * self.features,))
        gates_Bx4H = x_BxC.astype(self.dtype) @ w_x.astype(self.dtype) + h_BxH.astype(self.dtype) @ w_h.astype(self.dtype) + b
        i, f, g, o = jnp.split(gates_Bx4H.astype(jnp.float32), 4, axis=-1)
        c_BxH = jax.nn.sigmoid(f) * c_BxH + jax.nn.sigmoid(i) * jnp.tanh(g)
        h_BxH = jax.nn.sigmoid(o) * jnp.tanh(c_BxH)
        return (c_BxH, h_BxH), h_BxH

    @nn.nowrap
    def initialize_carry(self, rng, input_shape):
        zeros = jnp.zeros(tuple(input_shape[:-1]) + (self.features,), jnp.float32)
        return zeros, zeros

    @property
    def num_feature_axes(self) -> int:
        return 1


class GRUCell(nn.RNNCellBase):
    """r, z = sigmoid(x W_x + b_x + h W_h); n = tanh(x W_xn + b_xn + r (h W_hn + b_hn)); h' = (1 - z) n + z h."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h_BxH, x_BxC):
        hidden = self.features
        w_x = self.param("input_kernel", nn.initializers.lecun_normal(), (x_BxC.shape[-1], 3 * hidden))
        b_x = self.param("input_bias", nn.initializers.zeros_init(), (3 * hidden,))
        w_h = self.param("recurrent_kernel", _per_gate(nn.initializers.orthogonal(), 3), (hidden, 3 * hidden))
        b_hn = self.param("recurrent_bias_n", nn.initializers.zeros_init(), (hidden,))
        xr, xz, xn = jnp.split((x_BxC.astype(self.dtype) @ w_x.astype(self.dtype) + b_x).astype(jnp.float32), 3, -1)
        hr, hz, hn = jnp.split((h_BxH.astype(self.dtype) @ w_h.astype(self.dtype)).astype(jnp.float32), 3, -1)
        r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * (hn + b_hn))
        h_BxH = (1.0 - z) * n + z * h_BxH
        return h_BxH, h_BxH

    @nn.nowrap
    def initialize_carry(self, rng, input_shape):
        return jnp.zeros(tuple(input_shape[:-1]) + (self.features,), jnp.float32)

    @property
    def num_feature_axes(self) -> int:
        return 1


def _per_gate(init, gates: int):
    """An initializer for a (H, gates * H) kernel that initialises each gate's (H, H) block separately."""
    def initializer(key, shape, dtype=jnp.float32):
        keys = jax.random.split(key, gates)
        return jnp.concatenate([init(k, (shape[0], shape[1] // gates), dtype) for k in keys], axis=1)
    return initializer


def make_cell(kind: str, features: int, dtype=jnp.float32, name: str | None = None) -> nn.RNNCellBase:
    if kind == "lstm":
        return LSTMCell(features, dtype, name=name)
    elif kind == "gru":
        return GRUCell(features, dtype, name=name)
    raise ValueError(f"unknown cell {kind!r}; expected 'lstm' or 'gru'")


class RNNStack(nn.Module):
    """`num_layers` recurrent layers (each optionally bidirectional, directions concatenated), dropout between."""

    cell: str = "lstm"  # lstm | gru
    hidden: int = 128
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxC: Float[Array, "B T C"], lengths_B: Int[Array, "B"] | None = None, *,
                 train: bool = False) -> Float[Array, "B T F"]:
        _checks.expect(self, x_BxTxC, "(batch, time, features)", "float", "inputs")
        if lengths_B is not None:
            _checks.expect(self, lengths_B, "(batch,)", "int", "lengths", {"batch": x_BxTxC.shape[0]})
        for i in range(self.num_layers):
            forward = nn.RNN(make_cell(self.cell, self.hidden, self.dtype), name=f"forward_{i}")
            if self.bidirectional:
                backward = nn.RNN(make_cell(self.cell, self.hidden, self.dtype), reverse=True, keep_order=True,
                                  name=f"backward_{i}")
                x_BxTxC = nn.Bidirectional(forward, backward, name=f"layer_{i}")(x_BxTxC, seq_lengths=lengths_B)
            else:
                x_BxTxC = forward(x_BxTxC, seq_lengths=lengths_B)
            if i < self.num_layers - 1:
                x_BxTxC = nn.Dropout(self.dropout, deterministic=not train)(x_BxTxC)
        return x_BxTxC


class CharRNNLM(nn.Module):
    """Embedding -> unidirectional RNN stack -> logits over the next token."""

    vocab_size: int
    embed: int = 64
    hidden: int = 256
    num_layers: int = 2
    cell: str = "lstm"
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens_BxT: Int[Array, "B T"], *, train: bool = False) -> Float[Array, "B T V"]:
        _checks.expect(self, tokens_BxT, "(batch, time)", "int", "tokens")
        x_BxTxE = nn.Embed(self.vocab_size, self.embed)(tokens_BxT)
        h_BxTxH = RNNStack(self.cell, self.hidden, self.num_layers, False, self.dropout, self.dtype)(x_BxTxE, train=train)
        h_BxTxH = nn.Dropout(self.dropout, deterministic=not train)(h_BxTxH)
        return Dense(self.vocab_size, dtype=self.dtype)(h_BxTxH).astype(jnp.float32)


class RNNClassifier(nn.Module):
    """Tokens (B, T) or real-valued signals (B, T, C) -> (bi)RNN -> mean over real steps -> class logits."""

    num_classes: int
    vocab_size: int | None = None  # None: inputs are real-valued (B, T, C)
    embed: int = 64
    hidden: int = 128
    num_layers: int = 1
    bidirectional: bool = True
    cell: str = "lstm"
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs, lengths_B: Int[Array, "B"] | None = None, *, train: bool = False) -> Float[Array, "B K"]:
        if self.vocab_size is not None:
            _checks.expect(self, inputs, "(batch, time)", "int", f"tokens (vocab_size={self.vocab_size})")
            x_BxTxC = nn.Embed(self.vocab_size, self.embed)(inputs)
        else:
            _checks.expect(self, inputs, "(batch, time, channels)", "float", "signals (vocab_size=None)")
            x_BxTxC = inputs.astype(jnp.float32)
        batch, steps = x_BxTxC.shape[:2]
        if lengths_B is None:
            lengths_B = jnp.full((batch,), steps, jnp.int32)
        _checks.expect(self, lengths_B, "(batch,)", "int", "lengths", {"batch": batch})
        h_BxTxF = RNNStack(self.cell, self.hidden, self.num_layers, self.bidirectional, self.dropout,
                           self.dtype)(x_BxTxC, lengths_B, train=train)
        valid_BxT = (jnp.arange(steps)[None] < lengths_B[:, None]).astype(jnp.float32)
        pooled_BxF = (h_BxTxF * valid_BxT[..., None]).sum(1) / jnp.maximum(valid_BxT.sum(1, keepdims=True), 1.0)
        pooled_BxF = nn.Dropout(self.dropout, deterministic=not train)(pooled_BxF)
        return Dense(self.num_classes, dtype=self.dtype)(pooled_BxF).astype(jnp.float32)


TinyLM = functools.partial(CharRNNLM, embed=16, hidden=32, num_layers=2)
TinyClassifier = functools.partial(RNNClassifier, embed=16, hidden=16, num_layers=1)
