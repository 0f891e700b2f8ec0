"""MultiHeadAttention: shapes, fused == einsum reference, padding masks, grouped-query heads, RoPE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxml.models import attention


def _init_apply(module, *args, **kw):
    variables = module.init(jax.random.key(0), *args, **kw)
    return variables, module.apply(variables, *args, **kw)


def test_self_and_cross_attention_shapes():
    x_BxLxD = jax.random.normal(jax.random.key(1), (2, 5, 16))
    context_BxSxC = jax.random.normal(jax.random.key(2), (2, 7, 8))
    _, y = _init_apply(attention.MultiHeadAttention(num_heads=4), x_BxLxD)
    assert y.shape == (2, 5, 16) and np.isfinite(y).all()
    variables, y = _init_apply(attention.MultiHeadAttention(num_heads=4), x_BxLxD, context_BxSxC)
    assert y.shape == (2, 5, 16)
    assert variables["params"]["key"]["kernel"].value.shape == (8, 4, 4)  # (C, heads, head_dim)


@pytest.mark.parametrize("kv_heads,causal,rope", [(None, False, False), (2, True, True), (1, True, False)])
def test_fused_equals_einsum(kv_heads, causal, rope):
    x_BxLxD = jax.random.normal(jax.random.key(1), (2, 6, 16))
    valid_BxS = jnp.array([[True] * 6, [True] * 4 + [False] * 2])
    mask = attention.key_padding_mask(valid_BxS, 6)
    kw = dict(num_heads=4, num_kv_heads=kv_heads, causal=causal, rope=rope)
    variables, ref = _init_apply(attention.MultiHeadAttention(**kw), x_BxLxD, None, mask)
    fused = attention.MultiHeadAttention(**kw, use_fused=True).apply(variables, x_BxLxD, None, mask)
    np.testing.assert_allclose(fused, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_fused", [False, True])
def test_padding_mask_makes_output_independent_of_pad_content(use_fused):
    x_BxLxD = jax.random.normal(jax.random.key(1), (2, 6, 16))
    valid_BxS = jnp.array([[True] * 6, [True] * 3 + [False] * 3])
    mask = attention.key_padding_mask(valid_BxS, 6)
    module = attention.MultiHeadAttention(num_heads=2, use_fused=use_fused)
    variables, y = _init_apply(module, x_BxLxD, None, mask)
    noise = jax.random.normal(jax.random.key(3), x_BxLxD.shape) * 100
    x_other = jnp.where(valid_BxS[..., None], x_BxLxD, noise)
    y_other = module.apply(variables, x_other, None, mask)
    # Real positions are unchanged whatever the padding holds.
    np.testing.assert_allclose(y_other[1, :3], y[1, :3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_other[0], y[0], rtol=1e-5, atol=1e-5)


def test_grouped_query_has_fewer_kv_params():
    x = jnp.ones((1, 3, 32))
    variables, _ = _init_apply(attention.MultiHeadAttention(num_heads=8, num_kv_heads=2), x)
    assert variables["params"]["key"]["kernel"].value.shape == (32, 2, 4)
    assert variables["params"]["query"]["kernel"].value.shape == (32, 8, 4)


def test_rope_scores_depend_on_relative_position_only():
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))
    score = lambda i, j: float(jnp.sum(attention.apply_rope(q, jnp.array([i])) * attention.apply_rope(k, jnp.array([j]))))
    assert score(3, 1) == pytest.approx(score(7, 5), rel=1e-4)


def test_bad_mask_shape_and_decode_without_causal_fail_loudly():
    x = jnp.ones((2, 4, 8))
    with pytest.raises(ValueError, match=r"expects \(batch=2, length=4, source=4\) boolean mask, got shape \(2, 4, 5\)"):
        attention.MultiHeadAttention(num_heads=2).init(jax.random.key(0), x, None, jnp.ones((2, 4, 5), bool))
    with pytest.raises(ValueError, match="causal=True"):
        attention.MultiHeadAttention(num_heads=2).init(jax.random.key(0), x, decode=True)


def test_softmax_equals_jax_softmax_to_second_order():
    x = 3.0 * jax.random.normal(jax.random.key(0), (4, 7))
    x = x.at[1, :3].set(attention._NEG)  # masked entries, as dot_product_attention writes them
    np.testing.assert_array_equal(attention.softmax(x), jax.nn.softmax(x, axis=-1))
    w = jax.random.normal(jax.random.key(1), (4, 7))

    def f(softmax):
        return lambda x: jnp.sum(w * softmax(x, axis=-1) ** 2)

    ours, ref = f(attention.softmax), f(jax.nn.softmax)
    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(ref)(x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(jax.hessian(ours)(x[0]), jax.hessian(ref)(x[0]), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(attention.softmax(x, 0), jax.nn.softmax(x, axis=0))
    _, tangent = jax.jvp(lambda x: attention.softmax(x, 0), (x,), (w,))
    np.testing.assert_allclose(tangent, jax.jvp(lambda x: jax.nn.softmax(x, axis=0), (x,), (w,))[1],
                               rtol=1e-5, atol=1e-7)


def test_scanned_attention_stacks_one_weights_sized_residual():
    # jax 0.10's own softmax makes a scan over layers stack the logits and exp(logits) or the
    # weights for the backward pass; ours stacks the weights only (the residuals are the
    # leaves of jax.vjp's function; outside a scan XLA drops unused ones anyway).
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 5, 4, 8)) for i in range(3))
    mask = jnp.tril(jnp.ones((5, 5), bool))[None].repeat(2, 0)

    def layers(q, k, v):
        def body(x, _):
            return attention.dot_product_attention(x, k, v, mask), None
        return jax.lax.scan(body, q, None, length=3)[0]

    _, f_vjp = jax.vjp(layers, q, k, v)
    stacked_weights = [a for a in jax.tree.leaves(f_vjp) if a.shape == (3, 2, 4, 1, 5, 5)]
    assert len(stacked_weights) == 1 and stacked_weights[0].dtype == jnp.float32


def _dot_generals(fn, *args) -> int:
    return sum(eqn.primitive.name == "dot_general" for eqn in jax.make_jaxpr(fn)(*args).eqns)


@pytest.mark.parametrize("mask_batch", [4, 1, None])
def test_batch_blocks_compute_the_same_attention(monkeypatch, mask_batch):
    # GQA (4 query heads over 2 kv heads), a per-example padding mask, one broadcast over the batch, none.
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(keys[0], (4, 5, 4, 8)), jax.random.normal(keys[1], (4, 7, 2, 8)),
               jax.random.normal(keys[2], (4, 7, 2, 8)))
    valid_BxS = jnp.arange(7)[None] < jnp.array([7, 5, 3, 6])[:, None]
    mask = None if mask_batch is None else attention.key_padding_mask(valid_BxS, 5)[:mask_batch]

    def loss(q, k, v):
        return (attention.dot_product_attention(q, k, v, mask) ** 2).sum()

    results = {}
    for blocks in (1, 2):
        monkeypatch.setattr(attention, "BATCH_BLOCKS", blocks)
        results[blocks] = (attention.dot_product_attention(q, k, v, mask), jax.grad(loss, argnums=(0, 1, 2))(q, k, v))
        # Two blocks: each einsum of the forward pass twice, and the blocks' gradients side by side.
        assert _dot_generals(lambda q, k, v: attention.dot_product_attention(q, k, v, mask), q, k, v) == 2 * blocks
    np.testing.assert_allclose(results[2][0], results[1][0], rtol=1e-6, atol=1e-6)
    for g2, g1 in zip(results[2][1], results[1][1]):
        np.testing.assert_allclose(g2, g1, rtol=1e-5, atol=1e-6)


def test_batch_blocks_by_backend_devices_and_batch(monkeypatch):
    q = jnp.ones((4, 3, 2, 8))
    # Attention-weight dropout draws one mask for the whole batch: it keeps one block.
    monkeypatch.setattr(attention, "BATCH_BLOCKS", 2)
    assert _dot_generals(lambda q: attention.dot_product_attention(q, q, q, None, dropout_rng=jax.random.key(0),
                                                                   dropout=0.1), q) == 2
    assert attention.batch_blocks(3) == 1  # a forced count applies where it divides the batch
    monkeypatch.setattr(attention, "BATCH_BLOCKS", 0)
    with pytest.raises(ValueError, match="BATCH_BLOCKS must be None or a positive integer, got 0"):
        attention.batch_blocks(4)
    monkeypatch.setattr(attention, "BATCH_BLOCKS", None)
    assert jax.device_count() == 8 and attention.batch_blocks(4) == 1  # several devices: one block
    monkeypatch.setattr(jax, "device_count", lambda *a: 1)
    old_jaxlib = attention.runtime.jaxlib_version() < (0, 11)
    assert attention.batch_blocks(4) == (2 if old_jaxlib else 1) and attention.batch_blocks(3) == 1
