"""jaxml.models.dense: the same values and derivatives as x @ w, and (on jaxlib 0.10's CPU) a
kernel gradient XLA runs on YNNPACK instead of Eigen."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxml import runtime
from jaxml.models import dense, transformer


@pytest.fixture
def copy_on(monkeypatch):
    """The CPU rewrite, whichever jaxlib is installed and however many devices (it is read when a
    function is traced)."""
    monkeypatch.setattr(dense, "copies_transposed_operand", lambda: True)


def _loss(mm):
    return lambda x, w: jnp.sum(jnp.sin(mm(x, w)))


# (batch dims + K, N): K < N copies x^T, K > N copies dy^T, K == N, and a 3-D input.
SHAPES = [((96, 16), 48), ((96, 48), 16), ((96, 32), 32), ((4, 24, 40), 12)]


@pytest.mark.parametrize("x_shape,n", SHAPES)
def test_values_and_gradients_equal_plain_matmul(copy_on, x_shape, n):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, x_shape)
    w = jax.random.normal(kw, (x_shape[-1], n)) / np.sqrt(x_shape[-1])
    np.testing.assert_allclose(jax.jit(dense.matmul)(x, w), x @ w, rtol=1e-6, atol=1e-6)
    got = jax.jit(jax.grad(_loss(dense.matmul), (0, 1)))(x, w)
    want = jax.jit(jax.grad(_loss(jnp.matmul), (0, 1)))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_forward_mode_and_second_order(copy_on):
    kx, kw, kv = jax.random.split(jax.random.key(1), 3)
    x, w = jax.random.normal(kx, (6, 5)), jax.random.normal(kw, (5, 3))
    v = jax.random.normal(kv, w.shape)
    got = jax.jvp(lambda w: _loss(dense.matmul)(x, w), (w,), (v,))
    want = jax.jvp(lambda w: _loss(jnp.matmul)(x, w), (w,), (v,))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(jax.hessian(_loss(dense.matmul), 1)(x, w),
                               jax.hessian(_loss(jnp.matmul), 1)(x, w), rtol=1e-4, atol=1e-5)
    # Only the input's tangent (a frozen kernel) and only the kernel's.
    np.testing.assert_allclose(jax.grad(_loss(dense.matmul))(x, w), jax.grad(_loss(jnp.matmul))(x, w), rtol=1e-5)
    np.testing.assert_allclose(jax.jacfwd(dense.matmul, 1)(x, w), jax.jacfwd(jnp.matmul, 1)(x, w), rtol=1e-6)


def test_vmap_and_sharded_batch(copy_on):
    kx, kw = jax.random.split(jax.random.key(2))
    x, w = jax.random.normal(kx, (8, 32, 16)), jax.random.normal(kw, (16, 24))
    per = jax.vmap(jax.grad(_loss(dense.matmul), 1), (0, None))(x, w)
    np.testing.assert_allclose(per, jax.vmap(jax.grad(_loss(jnp.matmul), 1), (0, None))(x, w), rtol=1e-5, atol=1e-5)
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))  # as the engine
    sharded = jax.device_put(x, jax.NamedSharding(mesh, jax.P("data")))
    got = jax.jit(jax.grad(_loss(dense.matmul), 1))(sharded, w)
    np.testing.assert_allclose(got, jax.grad(_loss(jnp.matmul), 1)(x, w), rtol=1e-5, atol=1e-5)


def test_dense_is_flax_dense_with_the_same_parameters(copy_on):
    x = jax.random.normal(jax.random.key(3), (4, 7, 12))
    ours, flax_dense = dense.Dense(5), nn.Dense(5)
    params = ours.init(jax.random.key(4), x)
    assert isinstance(ours, nn.Dense)  # LoRA and other interceptors still match it
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, flax_dense.init(jax.random.key(4), x))
    np.testing.assert_allclose(ours.apply(params, x), flax_dense.apply(params, x), rtol=1e-6)
    g = jax.grad(lambda p: jnp.sum(ours.apply(p, x) ** 2))(params)
    r = jax.grad(lambda p: jnp.sum(flax_dense.apply(p, x) ** 2))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), g, r)
    y16 = dense.Dense(5, dtype=jnp.bfloat16).apply(params, x)  # bf16 compute, f32 parameters
    assert y16.dtype == jnp.bfloat16
    g16 = jax.grad(lambda p: jnp.sum(dense.Dense(5, dtype=jnp.bfloat16).apply(p, x).astype(jnp.float32)))(params)
    assert g16["params"]["kernel"].dtype == jnp.float32


def test_other_contractions_fall_through_to_dot_general():
    a, b = jnp.ones((3, 4, 5)), jnp.ones((3, 5, 2))
    batched = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_allclose(dense.dot_general(a, b, batched), jax.lax.dot_general(a, b, batched))
    with pytest.raises(ValueError, match=r"expected x \(\.\.\., K\) and w \(K, N\); got x \(3, 4\), w \(5, 2\)"):
        dense.matmul(jnp.ones((3, 4)), jnp.ones((5, 2)))


def _eigen_dots(compiled_text: str) -> list[str]:
    """The entry computation's dot instructions: XLA:CPU runs these on Eigen (YNNPACK's sit in fusions)."""
    entry = compiled_text[compiled_text.index("\nENTRY"):]
    return re.findall(r"\n *(?:ROOT )?%\S+ = f32\[[\d,]+\]\{[\d,]+\} dot\(", entry)


def _kernel_gradient_hlo(mm, k, n):
    x, w = jnp.ones((2048, k)), jnp.ones((k, n))
    return jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(mm(x, w))))).lower(w, x).compile().as_text()


@pytest.mark.parametrize("k,n", [(128, 512), (512, 128)])
def test_kernel_gradient_leaves_eigen_where_the_copy_is_on(k, n, monkeypatch):
    plain = _eigen_dots(_kernel_gradient_hlo(jnp.matmul, k, n))
    if runtime.jaxlib_version() >= (0, 11):
        # Why the copy is off there: XLA:CPU already runs the folded x^T @ dy on YNNPACK.
        assert not dense.COPY_TRANSPOSED_OPERAND
        assert plain == []
        return
    assert dense.COPY_TRANSPOSED_OPERAND
    assert len(plain) == 1  # x^T @ dy, folded: Eigen
    assert not dense.copies_transposed_operand()  # tests run on 8 devices (see the sharding test below)
    monkeypatch.setattr(dense, "copies_transposed_operand", lambda: True)  # as with one device
    assert _eigen_dots(_kernel_gradient_hlo(dense.matmul, k, n)) == []


def test_a_data_sharded_batch_is_not_gathered_to_every_device():
    """With several devices the kernel gradient is per-device partial products and an all-reduce:
    no all-gather of x (the layout-constrained copy would replicate it), for 2-D and time-major
    3-D inputs (the recurrent layers' input projections, batch on axis 1)."""
    assert jax.device_count() > 1
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    for x_shape, spec in [((64, 24), jax.P("data")), ((5, 16, 24), jax.P(None, "data"))]:
        for n in (16, 32):
            for mm in (dense.matmul, dense.weight_tangent):  # the layers' and the recurrent scans' form
                x, w = jnp.ones(x_shape), jnp.ones((24, n))
                sharded = jax.device_put(x, jax.NamedSharding(mesh, spec))
                f = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(mm(x, w))), (0, 1)))
                hlo = f.lower(w, sharded).compile().as_text()
                assert "all-gather" not in hlo and "all-reduce" in hlo, (x_shape, n, mm.__name__)


def test_other_backends_get_a_plain_matmul(copy_on):
    f = jax.jit(jax.grad(lambda w, x: jnp.sum(dense.matmul(x, w) ** 2)))
    args = jnp.ones((8, 16)), jnp.ones((64, 8))
    assert "LayoutConstraint" in f.trace(*args).lower(lowering_platforms=("cpu",)).as_text()
    for platform in ("cuda", "tpu"):
        assert "LayoutConstraint" not in f.trace(*args).lower(lowering_platforms=(platform,)).as_text()


def test_scanned_transformer_layers_keep_plain_dense(copy_on):
    """In a scan body the copy becomes a stacked residual (a scanned GPT step 1.18x slower): the
    scanned stack's MLP uses flax's Dense, the unrolled one jaxml's; the gradients agree."""
    block = functools.partial(transformer.TransformerBlock, num_heads=2, mlp_dim=32)
    x = jax.random.normal(jax.random.key(5), (2, 6, 16))
    scanned = transformer.TransformerStack(num_layers=2, block=block, scan_layers=True)
    unrolled = transformer.TransformerStack(num_layers=2, block=block, scan_layers=False)
    stacked = nn.unbox(scanned.init(jax.random.key(6), x))
    per_layer = {"params": {f"layer_{i}": jax.tree.map(lambda a: a[i], stacked["params"]["layers"])
                            for i in range(2)}}
    grad_scan = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.tanh(scanned.apply(p, x)))))
    grad_unrolled = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.tanh(unrolled.apply(p, x)))))
    assert "LayoutConstraint" not in grad_scan.lower(stacked, x).as_text()
    assert "LayoutConstraint" in grad_unrolled.lower(per_layer, x).as_text()
    g_scan, g_unrolled = grad_scan(stacked, x), grad_unrolled(per_layer, x)
    for i in range(2):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-5),
                     g_scan["params"]["layers"], g_unrolled["params"][f"layer_{i}"])
