"""`Dense` and `matmul`: x @ w whose weight gradient runs on XLA:CPU's fast matmul library.

A dense layer's kernel gradient is x^T @ dy over every row of the batch. XLA folds that
transpose into the dot (TransposeFolding), and jaxlib 0.10's XLA:CPU gives a dot whose left
operand is transposed to Eigen rather than YNNPACK: at the GPT's MLP sizes (2048 rows,
128 <-> 512) Eigen takes 1.8-2.7 ms, YNNPACK 1.4 ms after a 0.1-0.3 ms copy. `matmul`
computes the same values with a custom JVP whose transpose, when lowered for the CPU, copies
the narrower of x and dy into a row-major transpose (a layout constraint keeps XLA from
folding it back) and contracts it in the form YNNPACK takes: train steps 0.85x (GPT),
0.91x (ViT), 0.95x (CNN) on jax 0.10.2. jaxlib >= 0.11's YNNPACK takes the folded dot
itself (the copy made the CNN 1.06x slower on 0.12.1), and other backends transpose for
free, so there and on jaxlib >= 0.11 it is a plain `x @ w`; with more than one device too
(a layout constraint on a data-sharded operand would all-gather it: `copies_transposed_operand`).

Not for scan bodies: there the copy becomes a stacked residual of the loop (a scanned 4-layer
GPT step took 1.18x as long; the LSTM cell's matmuls gained nothing), so TransformerStack's
scanned layers and the recurrent cells keep plain matmuls. `rnn.LSTM` and `rnn.GRU` instead
take their input projections and kernel gradients out of the time loop, and those use it.

`Dense` is `flax.linen.Dense` with this matmul: same parameters, names and initialisers.
A `custom_jvp` (not `custom_vjp`), so forward mode (`jax.jvp`, `jax.hessian`) works too.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.experimental.layout import Layout, with_layout_constraint

from jaxml import runtime

# Only jaxlib < 0.11's XLA:CPU sends a dot with a transposed left operand to Eigen.
COPY_TRANSPOSED_OPERAND = runtime.jaxlib_version() < (0, 11)


def copies_transposed_operand() -> bool:
    """Whether `matmul`'s kernel gradient copies a transposed operand (read when a function is
    traced): on jaxlib < 0.11 with a single device. With several, XLA's partitioner replicates
    a layout-constrained operand, so a data-sharded x would be all-gathered to every device and
    each would compute the whole kernel gradient (found 2026-12-06 with 8 CPU devices)."""
    return COPY_TRANSPOSED_OPERAND and jax.device_count() == 1


def _row_major(a):
    """`a` materialised row-major: XLA cannot fold a transpose through it into a dot."""
    return with_layout_constraint(a, Layout(major_to_minor=tuple(range(a.ndim))))


@jax.custom_jvp
def _matmul(x, w):
    return x @ w


def _matmul_jvp(primals, tangents):
    x, w = primals
    dx, dw = tangents
    y = x @ w
    dy = jnp.zeros_like(y)
    if not isinstance(dx, SymbolicZero):
        dy = dx @ w
    if not isinstance(dw, SymbolicZero):
        dy = dy + weight_tangent(x, dw)
    return y, dy


def weight_tangent(x, dw):
    """x (..., K) @ dw (K, N) for a weight tangent dw. Linear in dw; on jaxlib 0.10's CPU its
    transpose, the kernel gradient x^T @ ct, contracts a row-major copy (see the module doc).
    Shared by `matmul`'s JVP and the recurrent layers' (`rnn.lstm_scan`, `rnn.gru_scan`)."""
    if copies_transposed_operand():  # one device: as rows, the form XLA:CPU 0.10 runs fastest
        rows = x.reshape(-1, x.shape[-1])
        out = jax.lax.platform_dependent(rows, dw, cpu=_x_dw_cpu, default=jnp.matmul)
        return out.reshape(x.shape[:-1] + (dw.shape[-1],))
    # x's leading axes stay axes: the kernel gradient contracts over all of them, so a batch
    # sharded on any of them (the recurrent layers' inputs are time-major, the batch second)
    # gives per-device partial products and an all-reduce, not an all-gather of x.
    return x @ dw


def _x_dw_cpu(x_MxK, dw_KxN):
    """x @ dw, written so that its transpose (the kernel gradient, x^T @ ct) copies the
    narrower of x and ct into a row-major transpose and contracts it in the form YNNPACK takes."""
    k, n = dw_KxN.shape
    if k <= n:  # (x^T)^T @ dw: the gradient is copy(x^T) @ ct
        return _row_major(x_MxK.T).T @ dw_KxN
    # (dw^T @ x^T)^T. A layout constraint transposes to the same constraint, so the gradient
    # is (copy(ct^T) @ x)^T, the product kept row-major and only the small (N, K) transposed.
    return _row_major(_row_major(dw_KxN.T) @ x_MxK.T).T


_matmul.defjvp(_matmul_jvp, symbolic_zeros=True)


def matmul(x, w):
    """x (..., K) @ w (K, N); on jaxlib 0.10's CPU its kernel gradient contracts a row-major copy."""
    if w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"matmul: expected x (..., K) and w (K, N); got x {x.shape}, w {w.shape}")
    if copies_transposed_operand() and x.ndim >= 2 and x.dtype == w.dtype:
        return _matmul(x, w)
    return x @ w


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general`, through `matmul` for Dense's contraction (last axis of lhs with the
    first of a 2-D rhs) when no precision or result type is asked for."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    if (rhs.ndim == 2 and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
            and not lhs_batch and not rhs_batch and precision is None and preferred_element_type is None):
        return matmul(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)


Dense = functools.partial(nn.Dense, dot_general=dot_general)
Dense.__doc__ = "flax.linen.Dense whose kernel gradient uses `jaxml.models.dense.matmul`."
