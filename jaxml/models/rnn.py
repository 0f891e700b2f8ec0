"""Recurrent networks: fused LSTM and GRU cells, whole-sequence LSTM and GRU layers, stacked
(optionally bidirectional) layers, LM and classifier heads.

Shape letters: B batch, T time, C input features, H hidden, V vocabulary, K classes. The cells
compute the same function as Flax's `nn.LSTMCell` / `nn.GRUCell` but with one matmul per input
and per state for all gates (faster on every backend). `RNNStack` runs its layers with `LSTM` /
`GRU`, which take a whole sequence: the input projection is one matmul over all time steps, and
the recurrence's JVP is written so that reverse mode computes the recurrent weights' gradients
after the time loop, not as a per-step accumulation inside it (see `lstm_scan`). On CPU, for
batches of up to 32 and ~256 hidden units, the forward time loop runs the batch as two
interleaved row blocks per step (`row_blocks`), so that two cores each take one block's matmul
and gate arithmetic instead of sharing one small matmul and then idling through the gate
arithmetic. On CPU, for sequences and batches of 16 or more, each layer also runs its sequence
as four consecutive time chunks (`time_chunks`), each chunk its own input projection, time loop
and weight-gradient matmuls: in reverse mode the matmuls of one chunk, and the layer below's
backward loop, then run beside the next chunk's backward loop, whose steps leave a core idle.
The same function either way. With `seq_lengths`, the backward direction reverses only each
sequence's real steps (as `nn.RNN(reverse=True, keep_order=True)`); outputs at padded steps are
not meaningful, and the heads mask them.
"""

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.recurrent import flip_sequences
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Float, Int

from jaxml.models import _checks
from jaxml.models.dense import Dense, matmul, weight_tangent


def _auto_row_blocks(batch: int, hidden: int) -> int:
    """The forward time loop's row blocks when none are given: 2 on CPU with two or more cores
    for an even batch of 2-32 and a hidden size of 192-384, else 1: where two blocks measured
    faster. On 2 cores (2026-12-06, jax 0.10.2), a train step of the char LM (2 layers, context
    64) with two blocks against one: hidden 256 at batch 8 / 16 / 32 / 64 / 128: 0.95x / 0.90x /
    0.92-0.94x / 1.0x / 1.0x (0.90x on jax 0.12.1; GRU cells 0.89-0.94x); hidden 128: 0.97x (GRU
    0.99x); hidden 512: 1.01x at batch 32, 1.04x at 8; the 64- and 128-wide biLSTM classifiers
    (context 128): 1.04x, 1.01x. Accelerators keep one block (two kernels per step for one)."""
    return 2 if (jax.default_backend() == "cpu" and _cpu_cores() >= 2 and 2 <= batch <= 32 and batch % 2 == 0
                 and 192 <= hidden <= 384) else 1


def _resolve_row_blocks(name: str, row_blocks: int | None, batch: int, hidden: int) -> int:
    """None: `_auto_row_blocks`. A count applies to the batches it divides; others (a model sees
    its train, eval and sampling batches) run as one block: it is a speed setting, not a function."""
    if row_blocks is None:
        return _auto_row_blocks(batch, hidden)
    if isinstance(row_blocks, bool) or not isinstance(row_blocks, int) or row_blocks < 1:
        raise ValueError(f"{name}: row_blocks must be None or a positive integer, got {row_blocks!r}")
    return row_blocks if batch % row_blocks == 0 else 1


def _block_rows(tree, blocks: int):
    """Splits axis 0 into `blocks` interleaved row blocks (rows b, b + blocks, ...). Interleaved, not
    contiguous: a batch sharded over devices in contiguous chunks keeps each block's rows on the
    device that holds them (a contiguous split would move rows between devices every step)."""
    return [jax.tree.map(lambda a: a.reshape((a.shape[0] // blocks, blocks) + a.shape[1:])[:, b], tree)
            for b in range(blocks)]


def _unblock_rows(trees):
    """Inverse of `_block_rows`."""
    return jax.tree.map(lambda *a: jnp.stack(a, 1).reshape((-1,) + a[0].shape[1:]), *trees)


def _scan_row_blocks(step, carry, xs, blocks: int):
    """`lax.scan(step, carry, xs)` for a step that is row-wise in the batch (axis 0 of the carry
    and of each step's inputs and outputs), computing `blocks` interleaved row blocks side by
    side in each step: independent matmuls and elementwise ops that XLA runs on different cores."""
    if blocks == 1:
        return jax.lax.scan(step, carry, xs)

    def body(carries, x):
        results = [step(c, x_b) for c, x_b in zip(carries, _block_rows(x, blocks))]
        return [c for c, _ in results], _unblock_rows([y for _, y in results])

    carries, ys = jax.lax.scan(body, _block_rows(carry, blocks), xs)
    return _unblock_rows(carries), ys


def _cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _auto_time_chunks(steps: int, batch: int) -> int:
    """A layer's time chunks when none are given: 4 on CPU with two or more cores for sequences of
    16 steps or more and batches of 16 or more, else 1. In reverse mode each chunk's input and
    weight gradients (two matmuls) and the layer below's backward loop over the later chunks can
    then run while this layer's backward loop works through the earlier ones, on the core that loop
    leaves idle (a backward step is one small matmul and then elementwise work on one core; in an
    xprof trace of the LM's step, traced ops filled 76% of the two threads' time with 4 chunks, 65%
    with one). On 2 cores (2026-12-07, jax 0.10.2), a train step with 1 / 2 / 4 / 8 chunks,
    interleaved in one process: the 2x256 char LM (context 64, batch 32) 1 / 0.92-0.99 / 0.91-0.97 /
    0.98; GRU cells 1 / 0.95 / 0.86-0.88 / 0.97; hidden 128 / 512: 0.90 / 0.93 with 2, 0.92 with 4;
    batch 8 / 16 / 64 / 128 with 4: 0.97-1.03 / 0.93 / 0.97 / 0.92; context 256: 0.95; the 64-wide
    biLSTM classifier (context 128): 0.85-0.89 (8: 0.99, 16: 1.27); the 128-wide one at context 512,
    batch 64: 0.91 (8: 0.87); jax 0.12.1: the LM 0.96, GRU cells 0.92. Below batch 16 it did not
    pay: the LM's train step at batch 8 0.97-1.03x, its forward pass at batch 8 / 16 0.98x / 1.00x
    and at batch 1 (sampling) 1.06-1.09x. Accelerators keep one chunk."""
    return 4 if jax.default_backend() == "cpu" and _cpu_cores() >= 2 and steps >= 16 and batch >= 16 else 1


def _resolve_time_chunks(name: str, time_chunks: int | None, steps: int, batch: int) -> int:
    """None: `_auto_time_chunks`. A count larger than the steps is capped at one step a chunk."""
    if time_chunks is None:
        return _auto_time_chunks(steps, batch)
    if isinstance(time_chunks, bool) or not isinstance(time_chunks, int) or time_chunks < 1:
        raise ValueError(f"{name}: time_chunks must be None or a positive integer, got {time_chunks!r}")
    return max(1, min(time_chunks, steps))


def _run_time_chunks(chunk, carry, x_TxBxC, chunks: int):
    """`chunk(carry, x_txBxC) -> (carry, ys_txBx...)` over `chunks` consecutive pieces of the time
    axis (lengths differing by at most one), each piece starting from the carry the previous one
    ended with; the pieces' outputs joined on time. One piece is one call of `chunk`."""
    if chunks == 1:
        return chunk(carry, x_TxBxC)[1]
    bounds = np.linspace(0, x_TxBxC.shape[0], chunks + 1).round().astype(int)
    outputs = []
    # One split, not a slice per piece: its transpose (in reverse mode) is one concatenate of the
    # pieces' input gradients, so the layer below can start on the last piece's gradient while
    # this layer computes the earlier pieces'. Slices transpose to pads added together, which
    # waits for every piece (measured: the LM step 1.02-1.03x instead of 0.92-0.99x with 2 pieces).
    for x_txBxC in jnp.split(x_TxBxC, bounds[1:-1], axis=0):
        carry, ys = chunk(carry, x_txBxC)
        outputs.append(ys)
    return jnp.concatenate(outputs, 0)


def _lstm_params(module: nn.Module, in_features: int, features: int):
    """LSTMCell's parameters (names, shapes, initialisers), shared by `LSTMCell` and `LSTM`."""
    w_x = module.param("input_kernel", nn.initializers.lecun_normal(), (in_features, 4 * features))
    # Orthogonal per gate, as Flax initialises each gate's recurrent kernel.
    w_h = module.param("recurrent_kernel", _per_gate(nn.initializers.orthogonal(), 4), (features, 4 * features))
    b = module.param("bias", nn.initializers.zeros_init(), (4 * features,))
    return w_x, w_h, b


def _activations(x, tanh_lanes: np.ndarray):
    """float32 sigmoid of x, or tanh on the lanes of its last axis where `tanh_lanes` is set, as
    one elementwise op: sigmoid(x) = tanh(x / 2) / 2 + 1 / 2 (absolute error 1.5e-7 in float32,
    XLA's sigmoid 0.9e-7). One op instead of one per gate in a time loop, where each op of a
    step's small size costs more in launching than in arithmetic; and XLA:CPU's tanh is cheaper
    than its sigmoid's exp and division (the LSTM's train step 0.94-0.95x with both changes)."""
    half = np.where(tanh_lanes, 1.0, 0.5).astype(np.float32)
    return jnp.tanh(x.astype(jnp.float32) * half) * half + (1 - half)


def _lstm_activations(gates_Bx4H):
    """Activations of (B, 4H) pre-activations: sigmoid on the i, f, o lanes, tanh on the g lanes."""
    return _activations(gates_Bx4H, np.repeat(np.array([False, False, True, False]), gates_Bx4H.shape[-1] // 4))


def _lstm_update(gates_Bx4H, c_BxH):
    """Gates (i, f, g, o pre-activations) and cell -> new cell, new hidden, and the float32
    activations (B, 4H)."""
    act_Bx4H = _lstm_activations(gates_Bx4H)
    i, f, g, o = jnp.split(act_Bx4H, 4, axis=-1)
    c_BxH = f * c_BxH + i * g
    return c_BxH, o * jnp.tanh(c_BxH), act_Bx4H


class LSTMCell(nn.RNNCellBase):
    """i, f, g, o = split(x W_x + h W_h + b); c' = f c + i g; h' = o tanh(c')."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry, x_BxC):
        c_BxH, h_BxH = carry
        w_x, w_h, b = _lstm_params(self, x_BxC.shape[-1], self.features)
        gates_Bx4H = x_BxC.astype(self.dtype) @ w_x.astype(self.dtype) + h_BxH.astype(self.dtype) @ w_h.astype(self.dtype) + b
        c_BxH, h_BxH, _ = _lstm_update(gates_Bx4H, c_BxH)
        return (c_BxH, h_BxH), h_BxH

    @nn.nowrap
    def initialize_carry(self, rng, input_shape):
        zeros = jnp.zeros(tuple(input_shape[:-1]) + (self.features,), jnp.float32)
        return zeros, zeros

    @property
    def num_feature_axes(self) -> int:
        return 1


def _lstm_step(w_h, carry, xg_Bx4H, *, residuals: bool):
    """One time step given the projected input xg = x W_x + b; with `residuals`, also what the
    JVP's factors are computed from after the loop (`_lstm_coefficients`): the activations and
    the new cell. Saving these two, not the six factors, keeps the loop to a few ops per step."""
    c_BxH, h_BxH = carry
    c2_BxH, h2_BxH, act_Bx4H = _lstm_update(xg_Bx4H + h_BxH.astype(w_h.dtype) @ w_h, c_BxH)
    if not residuals:
        return (c2_BxH, h2_BxH), h2_BxH
    return (c2_BxH, h2_BxH), (h2_BxH, (act_Bx4H, c2_BxH))


def _lstm_coefficients(c0_BxH, act_TxBx4H, cs_TxBxH):
    """The tangent step's six per-step factors, for all steps at once (vectorised outside the loop):
    dc' = ci dgi + cf dgf + cg dgg + f dc;  dh' = co dgo + k dc'  (d* tangents of the pre-activations)."""
    i, f, g, o = jnp.split(act_TxBx4H, 4, axis=-1)
    tanh_c = jnp.tanh(cs_TxBxH)
    return (i * (1 - i) * g, f * (1 - f) * _previous(c0_BxH, cs_TxBxH), i * (1 - g * g), o * (1 - o) * tanh_c,
            f, o * (1 - tanh_c * tanh_c))


def lstm_scan(w_h, xg_TxBx4H, c0_BxH, h0_BxH, *, row_blocks: int | None = None):
    """Runs the LSTM recurrence over time-major projected inputs xg = x W_x + b.

    Returns the hidden states (T, B, H) and the final (c, h). Plain `lax.scan` when not
    differentiated. Its JVP (a custom one) is exact, and written for what reverse mode makes of
    it: the recurrent kernel's tangent enters as one (T*B, H) @ (H, 4H) product of the
    previous hidden states outside the time loop, so its transpose, the kernel gradient, is one
    matmul after the loop instead of T accumulations inside it (as cuDNN and oneDNN compute
    it); the forward loop saves each step's activations and cell, the six per-step factors of
    the tangent step are computed from them after the loop for all steps at once, and the
    tangent step multiplies by them and contracts with a pre-transposed kernel, so the backward
    loop is one plain matmul and a few elementwise products per step. The gate activations are
    one elementwise op per step (`_lstm_activations`). Forward mode (`jax.jvp`, Hessian-vector
    products) works as well.
    `row_blocks` (None: 2 on CPU for batches up to 32 at ~256 hidden units, else 1; see
    `_auto_row_blocks`) splits the forward loop's batch, where it divides it, into that many
    interleaved row blocks computed side by side; the result is the same function.
    """
    _expect_recurrence("lstm_scan", 4, w_h, xg_TxBx4H, c0_BxH, h0_BxH)
    return _lstm_scan(_resolve_row_blocks("lstm_scan", row_blocks, *c0_BxH.shape), w_h, xg_TxBx4H, c0_BxH, h0_BxH)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _lstm_scan(row_blocks, w_h, xg_TxBx4H, c0_BxH, h0_BxH):
    (c_BxH, h_BxH), hs_TxBxH = _scan_row_blocks(functools.partial(_lstm_step, w_h, residuals=False),
                                                (c0_BxH, h0_BxH), xg_TxBx4H, row_blocks)
    return hs_TxBxH, (c_BxH, h_BxH)


def _expect_recurrence(name: str, gates: int, w_h, xg, *states):
    """A clear error for shapes the recurrence cannot take (lax.scan's own would name none of them)."""
    hidden = w_h.shape[0] if w_h.ndim == 2 else -1
    if not (w_h.ndim == 2 and w_h.shape[1] == gates * hidden and xg.ndim == 3 and xg.shape[-1] == gates * hidden
            and all(s.shape == (xg.shape[1], hidden) for s in states)):
        raise ValueError(f"{name} expects a recurrent kernel (H, {gates}H), projected inputs (time, batch, {gates}H) "
                         f"and states (batch, H); got kernel {tuple(w_h.shape)}, inputs {tuple(xg.shape)}, "
                         f"states {', '.join(str(tuple(s.shape)) for s in states)}")


def _instantiate(tangent, like):
    return jnp.zeros(like.shape, like.dtype) if isinstance(tangent, SymbolicZero) else tangent


def _previous(h0_BxH, hs_TxBxH):
    """The hidden state each step starts from: h0, h_1, ..., h_{T-1}."""
    return jnp.concatenate([h0_BxH[None], hs_TxBxH[:-1]], 0)


def _times_transposed(dh_BxH, w_T):
    """dh @ w for w given as its transpose. In a tangent loop this makes the transposed
    (backward) loop's matmul a plain one with the pre-transposed copy (dh @ w's own transpose
    would be ct @ w^T)."""
    return jax.lax.dot_general(dh_BxH.astype(w_T.dtype), w_T, (((1,), (1,)), ((), ())))


def _lstm_scan_jvp(row_blocks, primals, tangents):
    w_h, xg_TxBx4H, c0_BxH, h0_BxH = primals
    dw_h, dxg_TxBx4H, dc0_BxH, dh0_BxH = tangents
    # Row blocks in the forward loop only: in the tangent loop (whose transpose is the backward
    # loop) they were slower for the LSTM (1.02x), the per-step work there being mostly the matmul.
    (c_BxH, h_BxH), (hs_TxBxH, (act_TxBx4H, cs_TxBxH)) = _scan_row_blocks(
        functools.partial(_lstm_step, w_h, residuals=True), (c0_BxH, h0_BxH), xg_TxBx4H, row_blocks)
    coefficients = _lstm_coefficients(c0_BxH, act_TxBx4H, cs_TxBxH)
    dxg_TxBx4H = _instantiate(dxg_TxBx4H, xg_TxBx4H)
    if not isinstance(dw_h, SymbolicZero):
        dxg_TxBx4H = dxg_TxBx4H + weight_tangent(_previous(h0_BxH, hs_TxBxH).astype(w_h.dtype), dw_h)
    w_h_T = w_h.T

    def tangent_step(carry, inputs):
        dc_BxH, dh_BxH = carry
        dxg_Bx4H, (ci, cf, cg, co, f, k) = inputs
        dg_Bx4H = dxg_Bx4H + _times_transposed(dh_BxH, w_h_T)
        dgi, dgf, dgg, dgo = jnp.split(dg_Bx4H.astype(jnp.float32), 4, axis=-1)
        dc_BxH = ci * dgi + cf * dgf + cg * dgg + f * dc_BxH
        dh_BxH = co * dgo + k * dc_BxH
        return (dc_BxH, dh_BxH), dh_BxH

    (dc_BxH, dh_BxH), dhs_TxBxH = jax.lax.scan(
        tangent_step, (_instantiate(dc0_BxH, c0_BxH), _instantiate(dh0_BxH, h0_BxH)), (dxg_TxBx4H, coefficients))
    return (hs_TxBxH, (c_BxH, h_BxH)), (dhs_TxBxH, (dc_BxH, dh_BxH))


_lstm_scan.defjvp(_lstm_scan_jvp, symbolic_zeros=True)


class _SequenceLayer(nn.Module):
    """A recurrent layer over whole sequences; subclasses give `_scan` (time-major in and out)."""

    features: int
    dtype: Any = jnp.float32
    reverse: bool = False
    time_major: bool = False
    row_blocks: int | None = None  # the forward loop's row blocks (`lstm_scan`); None: by backend and size
    time_chunks: int | None = None  # consecutive time chunks, each its own loop (`_auto_time_chunks`); None: by size

    @nn.compact
    def __call__(self, x: Float[Array, "B T C"], seq_lengths: Int[Array, "B"] | None = None) -> Float[Array, "B T H"]:
        _checks.expect(self, x, "(time, batch, features)" if self.time_major else "(batch, time, features)",
                       "float", "inputs")
        x_TxBxC = x if self.time_major else jnp.swapaxes(x, 0, 1)
        if self.reverse:
            x_TxBxC = flip_sequences(x_TxBxC, seq_lengths, num_batch_dims=1, time_major=True)
        hs_TxBxH = self._scan(x_TxBxC, _resolve_time_chunks(type(self).__name__, self.time_chunks, *x_TxBxC.shape[:2]))
        if self.reverse:
            hs_TxBxH = flip_sequences(hs_TxBxH, seq_lengths, num_batch_dims=1, time_major=True)
        return hs_TxBxH if self.time_major else jnp.swapaxes(hs_TxBxH, 0, 1)


class LSTM(_SequenceLayer):
    """An LSTM layer over whole sequences: `LSTMCell`'s function and parameters, scanned over time.

    Equal to `nn.RNN(LSTMCell(features, dtype), reverse=reverse, keep_order=True)` (zero
    initial carry), but the input projection is one matmul over all steps and the weight
    gradients are one matmul each after the time loop (`lstm_scan`; per time chunk where
    `time_chunks`, default 4 on CPU for sequences and batches of 16 or more, splits the
    sequence: `_auto_time_chunks`): a train step of the
    2x256 char LM took 0.81x the time of the `nn.RNN` form on 2 CPU cores with jax 0.10.2
    (0.88x with 0.12.1).
    `reverse` runs from each sequence's last real step (`seq_lengths`) back to its first and
    returns outputs in input order.
    """

    def _scan(self, x_TxBxC, chunks: int):
        w_x, w_h, b = _lstm_params(self, x_TxBxC.shape[-1], self.features)
        w_x, w_h = w_x.astype(self.dtype), w_h.astype(self.dtype)

        def chunk(carry, x_txBxC):
            xg_txBx4H = matmul(x_txBxC.astype(self.dtype), w_x) + b
            hs_txBxH, carry = lstm_scan(w_h, xg_txBx4H, *carry, row_blocks=self.row_blocks)
            return carry, hs_txBxH

        zeros_BxH = jnp.zeros((x_TxBxC.shape[1], self.features), jnp.float32)
        return _run_time_chunks(chunk, (zeros_BxH, zeros_BxH), x_TxBxC, chunks)


def _gru_params(module: nn.Module, in_features: int, features: int):
    """GRUCell's parameters (names, shapes, initialisers), shared by `GRUCell` and `GRU`."""
    w_x = module.param("input_kernel", nn.initializers.lecun_normal(), (in_features, 3 * features))
    b_x = module.param("input_bias", nn.initializers.zeros_init(), (3 * features,))
    w_h = module.param("recurrent_kernel", _per_gate(nn.initializers.orthogonal(), 3), (features, 3 * features))
    b_hn = module.param("recurrent_bias_n", nn.initializers.zeros_init(), (features,))
    return w_x, b_x, w_h, b_hn


def _gru_update(xg_Bx3H, hg_Bx3H, b_hn, h_BxH):
    """float32 input (with its bias) and recurrent projections -> new hidden and the activations
    r z (B, 2H), q = h W_hn + b_hn and n."""
    hidden = h_BxH.shape[-1]
    xg_Bx3H, hg_Bx3H = xg_Bx3H.astype(jnp.float32), hg_Bx3H.astype(jnp.float32)
    rz_Bx2H = _activations(xg_Bx3H[:, :2 * hidden] + hg_Bx3H[:, :2 * hidden], np.zeros(2 * hidden, bool))
    r, z = jnp.split(rz_Bx2H, 2, axis=-1)
    q = hg_Bx3H[:, 2 * hidden:] + b_hn
    n = jnp.tanh(xg_Bx3H[:, 2 * hidden:] + r * q)
    return (1.0 - z) * n + z * h_BxH, (rz_Bx2H, q, n)


class GRUCell(nn.RNNCellBase):
    """r, z = sigmoid(x W_x + b_x + h W_h); n = tanh(x W_xn + b_xn + r (h W_hn + b_hn)); h' = (1 - z) n + z h."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h_BxH, x_BxC):
        w_x, b_x, w_h, b_hn = _gru_params(self, x_BxC.shape[-1], self.features)
        h_BxH, _ = _gru_update(x_BxC.astype(self.dtype) @ w_x.astype(self.dtype) + b_x,
                               h_BxH.astype(self.dtype) @ w_h.astype(self.dtype), b_hn, h_BxH)
        return h_BxH, h_BxH

    @nn.nowrap
    def initialize_carry(self, rng, input_shape):
        return jnp.zeros(tuple(input_shape[:-1]) + (self.features,), jnp.float32)

    @property
    def num_feature_axes(self) -> int:
        return 1


def _gru_step(w_h, b_hn, h_BxH, xg_Bx3H, *, residuals: bool):
    """One GRU time step given xg = x W_x + b_x; with `residuals`, also what its JVP's factors are
    computed from after the loop (`_gru_coefficients`), as `_lstm_step`."""
    h2_BxH, activations = _gru_update(xg_Bx3H, h_BxH.astype(w_h.dtype) @ w_h, b_hn, h_BxH)
    if not residuals:
        return h2_BxH, h2_BxH
    return h2_BxH, (h2_BxH, activations)


def _gru_coefficients(h0_BxH, hs_TxBxH, rz_TxBx2H, q_TxBxH, n_TxBxH):
    """The tangent step's six per-step factors, for all steps at once:
    dn = cn dxn + cnr dhn + cr (dxr + dhr);  dh' = cz (dxz + dhz) + (1 - z) dn + z dh
    (dh* tangents of h W_h + b_hn, dx* of x W_x + b_x)."""
    r, z = jnp.split(rz_TxBx2H, 2, axis=-1)
    cn = 1 - n_TxBxH * n_TxBxH
    return (cn * r * (1 - r) * q_TxBxH, z * (1 - z) * (_previous(h0_BxH, hs_TxBxH) - n_TxBxH), cn, cn * r, 1 - z, z)


def gru_scan(w_h, b_hn, xg_TxBx3H, h0_BxH, *, row_blocks: int | None = None):
    """The GRU recurrence over time-major projected inputs xg = x W_x + b_x; returns the hidden
    states (T, B, H). Its JVP is `lstm_scan`'s construction for the GRU: the recurrent kernel's
    and bias's tangents enter as one product outside the time loop (their gradients are one
    matmul and one sum after it), the loop multiplies by six per-step factors computed after the
    forward loop from its saved activations.
    `row_blocks` as in `lstm_scan`."""
    _expect_recurrence("gru_scan", 3, w_h, xg_TxBx3H, h0_BxH)
    if b_hn.shape != (w_h.shape[0],):
        raise ValueError(f"gru_scan expects recurrent_bias_n ({w_h.shape[0]},), got {tuple(b_hn.shape)}")
    return _gru_scan(_resolve_row_blocks("gru_scan", row_blocks, *h0_BxH.shape), w_h, b_hn, xg_TxBx3H, h0_BxH)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _gru_scan(row_blocks, w_h, b_hn, xg_TxBx3H, h0_BxH):
    _, hs_TxBxH = _scan_row_blocks(functools.partial(_gru_step, w_h, b_hn, residuals=False), h0_BxH, xg_TxBx3H,
                                   row_blocks)
    return hs_TxBxH


def _gru_scan_jvp(row_blocks, primals, tangents):
    w_h, b_hn, xg_TxBx3H, h0_BxH = primals
    dw_h, db_hn, dxg_TxBx3H, dh0_BxH = tangents
    _, (hs_TxBxH, activations) = _scan_row_blocks(
        functools.partial(_gru_step, w_h, b_hn, residuals=True), h0_BxH, xg_TxBx3H, row_blocks)
    coefficients = _gru_coefficients(h0_BxH, hs_TxBxH, *activations)
    dxg_TxBx3H = _instantiate(dxg_TxBx3H, xg_TxBx3H)
    # Tangents of h W_h + b_hn that do not go through h: the loop adds them to dh W_h.
    dhg_TxBx3H = jnp.zeros(xg_TxBx3H.shape, jnp.float32)
    if not isinstance(dw_h, SymbolicZero):
        dhg_TxBx3H = dhg_TxBx3H + weight_tangent(_previous(h0_BxH, hs_TxBxH).astype(w_h.dtype), dw_h)
    if not isinstance(db_hn, SymbolicZero):
        dhg_TxBx3H = dhg_TxBx3H + jnp.concatenate([jnp.zeros((2 * db_hn.shape[-1],), db_hn.dtype), db_hn])
    w_h_T = w_h.T

    def tangent_step(dh_BxH, inputs):
        dxg_Bx3H, dhg_Bx3H, (cr, cz, cn, cnr, one_minus_z, z) = inputs
        dxr, dxz, dxn = jnp.split(dxg_Bx3H, 3, axis=-1)
        dhr, dhz, dhn = jnp.split((dhg_Bx3H + _times_transposed(dh_BxH, w_h_T)).astype(jnp.float32), 3, axis=-1)
        dh_BxH = cz * (dxz + dhz) + one_minus_z * (cn * dxn + cnr * dhn + cr * (dxr + dhr)) + z * dh_BxH
        return dh_BxH, dh_BxH

    _, dhs_TxBxH = jax.lax.scan(tangent_step, _instantiate(dh0_BxH, h0_BxH),
                                (dxg_TxBx3H, dhg_TxBx3H, coefficients))
    return hs_TxBxH, dhs_TxBxH


_gru_scan.defjvp(_gru_scan_jvp, symbolic_zeros=True)


class GRU(_SequenceLayer):
    """A GRU layer over whole sequences: `GRUCell`'s function and parameters, scanned over time
    with `gru_scan` (the input projection one matmul over all steps, the recurrent weights'
    gradients after the time loop). Equal to `nn.RNN(GRUCell(features, dtype), reverse=reverse,
    keep_order=True)` with a zero initial carry; a train step of the 2x256 char LM with GRU
    cells took 0.89x the time of that form on 2 CPU cores with jax 0.10.2 (0.92x with 0.12.1)."""

    def _scan(self, x_TxBxC, chunks: int):
        w_x, b_x, w_h, b_hn = _gru_params(self, x_TxBxC.shape[-1], self.features)
        w_x, w_h = w_x.astype(self.dtype), w_h.astype(self.dtype)

        def chunk(h_BxH, x_txBxC):
            xg_txBx3H = matmul(x_txBxC.astype(self.dtype), w_x) + b_x
            hs_txBxH = gru_scan(w_h, b_hn, xg_txBx3H, h_BxH, row_blocks=self.row_blocks)
            return hs_txBxH[-1], hs_txBxH

        return _run_time_chunks(chunk, jnp.zeros((x_TxBxC.shape[1], self.features), jnp.float32), x_TxBxC, chunks)


def _per_gate(init, gates: int):
    """An initializer for a (H, gates * H) kernel that initialises each gate's (H, H) block separately."""
    def initializer(key, shape, dtype=jnp.float32):
        keys = jax.random.split(key, gates)
        return jnp.concatenate([init(k, (shape[0], shape[1] // gates), dtype) for k in keys], axis=1)
    return initializer


_KINDS = {"lstm": (LSTMCell, LSTM), "gru": (GRUCell, GRU)}  # kind -> (cell, whole-sequence layer)


def _kind(kind: str):
    if kind not in _KINDS:
        raise ValueError(f"unknown cell {kind!r}; expected 'lstm' or 'gru'")
    return _KINDS[kind]


def make_cell(kind: str, features: int, dtype=jnp.float32, name: str | None = None) -> nn.RNNCellBase:
    return _kind(kind)[0](features, dtype, name=name)


class RNNStack(nn.Module):
    """`num_layers` recurrent layers (each optionally bidirectional, directions concatenated), dropout between."""

    cell: str = "lstm"  # lstm | gru
    hidden: int = 128
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0
    dtype: Any = jnp.float32
    row_blocks: int | None = None  # each layer's forward-loop row blocks (`lstm_scan`); None: by backend and size
    time_chunks: int | None = None  # each layer's time chunks (`LSTM`); None: by backend and size

    @nn.compact
    def __call__(self, x_BxTxC: Float[Array, "B T C"], lengths_B: Int[Array, "B"] | None = None, *,
                 train: bool = False) -> Float[Array, "B T F"]:
        _checks.expect(self, x_BxTxC, "(batch, time, features)", "float", "inputs")
        if lengths_B is not None:
            _checks.expect(self, lengths_B, "(batch,)", "int", "lengths", {"batch": x_BxTxC.shape[0]})
        cell_cls, layer_cls = _kind(self.cell)
        directions = (False, True) if self.bidirectional else (False,)
        x = jnp.swapaxes(x_BxTxC, 0, 1)  # the layers run time-major: (T, B, F)
        for i in range(self.num_layers):
            # Named as the cells of the nn.RNN form were (LSTMCell_0, ...), so checkpoints keep loading.
            outputs = [layer_cls(self.hidden, self.dtype, reverse=reverse, time_major=True, row_blocks=self.row_blocks,
                                 time_chunks=self.time_chunks,
                                 name=f"{cell_cls.__name__}_{len(directions) * i + reverse}")(x, seq_lengths=lengths_B)
                       for reverse in directions]
            x = jnp.concatenate(outputs, -1) if len(outputs) > 1 else outputs[0]
            if i < self.num_layers - 1:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return jnp.swapaxes(x, 0, 1)


class CharRNNLM(nn.Module):
    """Embedding -> unidirectional RNN stack -> logits over the next token."""

    vocab_size: int
    embed: int = 64
    hidden: int = 256
    num_layers: int = 2
    cell: str = "lstm"
    dropout: float = 0.0
    dtype: Any = jnp.float32
    row_blocks: int | None = None  # RNNStack's
    time_chunks: int | None = None  # RNNStack's

    @nn.compact
    def __call__(self, tokens_BxT: Int[Array, "B T"], *, train: bool = False) -> Float[Array, "B T V"]:
        _checks.expect(self, tokens_BxT, "(batch, time)", "int", "tokens")
        x_BxTxE = nn.Embed(self.vocab_size, self.embed)(tokens_BxT)
        h_BxTxH = RNNStack(self.cell, self.hidden, self.num_layers, False, self.dropout, self.dtype,
                           self.row_blocks, self.time_chunks)(x_BxTxE, train=train)
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
    row_blocks: int | None = None  # RNNStack's
    time_chunks: int | None = None  # RNNStack's

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
                           self.dtype, self.row_blocks, self.time_chunks)(x_BxTxC, lengths_B, train=train)
        valid_BxT = (jnp.arange(steps)[None] < lengths_B[:, None]).astype(jnp.float32)
        pooled_BxF = (h_BxTxF * valid_BxT[..., None]).sum(1) / jnp.maximum(valid_BxT.sum(1, keepdims=True), 1.0)
        pooled_BxF = nn.Dropout(self.dropout, deterministic=not train)(pooled_BxF)
        return Dense(self.num_classes, dtype=self.dtype)(pooled_BxF).astype(jnp.float32)


TinyLM = functools.partial(CharRNNLM, embed=16, hidden=32, num_layers=2)
TinyClassifier = functools.partial(RNNClassifier, embed=16, hidden=16, num_layers=1)
