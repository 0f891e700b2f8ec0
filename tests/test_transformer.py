"""Transformer models: causality via gradients, scan == unrolled stack, tied/untied heads, encoder padding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxml.models import transformer
from tests.test_attention import _dot_generals


def _tokens(shape, vocab=50, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def _unstacked(scanned, layers=3):
    """A scanned stack's weights in the unrolled stack's layout (layer_i = the stacked arrays at i)."""
    return {"params": {f"layer_{i}": jax.tree.map(lambda a: a[i], scanned["params"]["layers"])
                       for i in range(layers)}}


def _stack(scan_layers, causal=True, layers=3):
    block = functools.partial(transformer.TransformerBlock, num_heads=2, mlp_dim=32, causal=causal)
    return transformer.TransformerStack(layers, block, scan_layers=scan_layers)


@pytest.mark.parametrize("rope", [False, True])
def test_causality_gradient_after_t_is_zero(rope):
    block = functools.partial(transformer.TransformerBlock, num_heads=2, mlp_dim=32, causal=True, rope=rope)
    stack = transformer.TransformerStack(2, block)
    x_LxD = jax.random.normal(jax.random.key(0), (10, 16))
    variables = jax.jit(stack.init)(jax.random.key(1), x_LxD[None])
    t = 4
    grad_LxD = jax.jit(jax.grad(lambda x: stack.apply(variables, x[None])[0, t].sum()))(x_LxD)
    assert np.abs(grad_LxD[t + 1:]).max() == 0.0
    assert np.abs(grad_LxD[: t + 1]).min(axis=-1).max() > 0.0


def test_lm_logits_up_to_t_ignore_later_tokens():
    model = transformer.Tiny(vocab_size=50)
    tokens = _tokens((2, 12))
    variables = jax.jit(model.init)(jax.random.key(0), tokens)
    changed = tokens.at[:, 7:].set((tokens[:, 7:] + 1) % 50)
    apply = jax.jit(model.apply)
    a, b = apply(variables, tokens), apply(variables, changed)
    np.testing.assert_array_equal(a[:, :7], b[:, :7])
    assert np.abs(a[:, 7:] - b[:, 7:]).max() > 0


def test_scan_stack_equals_unrolled_stack():
    x = jax.random.normal(jax.random.key(0), (2, 6, 16))
    scanned = nn.unbox(jax.jit(_stack(True).init)(jax.random.key(1), x))
    unrolled = _unstacked(scanned)
    np.testing.assert_allclose(jax.jit(_stack(False).apply)(unrolled, x), jax.jit(_stack(True).apply)(scanned, x),
                               rtol=1e-5, atol=1e-5)


def test_scan_stack_gradients_equal_unrolled_stack():
    # The scanned stack's MLP uses gelu_one_residual (its own JVP); the unrolled one flax's gelu.
    x = jax.random.normal(jax.random.key(0), (2, 6, 16))
    scanned = nn.unbox(jax.jit(_stack(True).init)(jax.random.key(1), x))
    unrolled = _unstacked(scanned)

    def grads(stack, variables):
        return jax.jit(jax.grad(lambda v, x: jnp.sum(jnp.sin(stack.apply(v, x))), argnums=(0, 1)))(variables, x)

    (g_scan, gx_scan), (g_unrolled, gx_unrolled) = grads(_stack(True), scanned), grads(_stack(False), unrolled)
    for i in range(3):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-5),
                     g_scan["params"]["layers"], g_unrolled["params"][f"layer_{i}"])
    np.testing.assert_allclose(gx_scan, gx_unrolled, rtol=1e-4, atol=1e-5)


def test_gelu_one_residual_equals_flax_gelu_to_second_order():
    x = jnp.linspace(-6.0, 6.0, 241)
    np.testing.assert_array_equal(transformer.gelu_one_residual(x), nn.gelu(x))
    d1 = jax.vmap(jax.grad(transformer.gelu_one_residual))
    np.testing.assert_allclose(d1(x), jax.vmap(jax.grad(nn.gelu))(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(jax.grad(jax.grad(transformer.gelu_one_residual)))(x),
                               jax.vmap(jax.grad(jax.grad(nn.gelu)))(x), rtol=1e-4, atol=1e-5)
    # Forward mode too (custom_jvp), and bfloat16 stays bfloat16.
    _, tangent = jax.jvp(transformer.gelu_one_residual, (x,), (jnp.ones_like(x),))
    np.testing.assert_allclose(tangent, d1(x), rtol=1e-6)
    xb = x.astype(jnp.bfloat16)
    _, tb = jax.jvp(transformer.gelu_one_residual, (xb,), (jnp.ones_like(xb),))
    assert tb.dtype == jnp.bfloat16
    np.testing.assert_allclose(tb.astype(np.float32), d1(x), atol=0.02)


def test_scanned_mlp_keeps_fewer_stacked_residuals(monkeypatch):
    # The backward pass's residuals are the leaves of jax.vjp's function. With flax's gelu
    # the scan stacks each intermediate of the tanh formula, (layers, batch, len, mlp_dim) each.
    block = functools.partial(transformer.TransformerBlock, num_heads=2, mlp_dim=48, causal=True)
    stack = transformer.TransformerStack(3, block, scan_layers=True)
    x = jax.random.normal(jax.random.key(0), (2, 6, 16))
    variables = nn.unbox(jax.jit(stack.init)(jax.random.key(1), x))

    def mlp_wide_residuals():
        _, f_vjp = jax.vjp(lambda v: stack.apply(v, x), variables)
        return sum(getattr(a, "shape", None) == (3, 2, 6, 48) for a in jax.tree.leaves(f_vjp))

    ours = mlp_wide_residuals()
    monkeypatch.setattr(transformer, "gelu_one_residual", nn.gelu)
    plain = mlp_wide_residuals()
    assert ours <= 2 < plain, (ours, plain)  # gelu'(h) and gelu(h) (mlp_out's input) against 5-6


def test_tied_and_untied_parameter_counts():
    def count(m):
        shapes = jax.eval_shape(m.init, jax.random.key(0), _tokens((1, 4)))
        return sum(a.size for a in jax.tree.leaves(nn.unbox(shapes)))

    tied, untied = count(transformer.Tiny(vocab_size=50)), count(transformer.Tiny(vocab_size=50, tied_embedding=False))
    assert untied - tied == 32 * 50 + 50  # the unembedding kernel and bias


def test_encoder_ignores_padding_content_and_seq2seq_shapes():
    encoder = transformer.Encoder(vocab_size=20, num_layers=2, features=32, num_heads=4, mlp_dim=64)
    src = _tokens((2, 8), vocab=20)
    valid = jnp.arange(8)[None] < jnp.array([[8], [5]])
    variables = jax.jit(encoder.init)(jax.random.key(0), src, valid)
    other = jnp.where(valid, src, (src + 3) % 20)
    apply = jax.jit(encoder.apply)
    a, b = apply(variables, src, valid), apply(variables, other, valid)
    np.testing.assert_allclose(a[1, :5], b[1, :5], rtol=1e-5, atol=1e-5)
    model = transformer.EncoderDecoder(vocab_size=20, features=32, num_heads=4, mlp_dim=64)
    out = jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0), src, src[:, :5], valid), src,
                                             src[:, :5], valid))
    assert out.shape == (2, 5, 20)


@pytest.mark.parametrize("kind", ["lm", "seq2seq"])
def test_stack_blocks_compute_the_same_function(monkeypatch, kind):
    """An unrolled stack in two batch blocks: the same outputs and gradients (an LM; an
    encoder-decoder, whose padding masks and cross-attention context are split with the batch)."""
    if kind == "lm":
        model = transformer.DecoderLM(vocab_size=30, num_layers=2, features=32, num_heads=4, mlp_dim=64, max_len=16,
                                      scan_layers=False, num_kv_heads=2)
        args = (_tokens((4, 16), vocab=30),)
    else:
        model = transformer.EncoderDecoder(vocab_size=20, num_layers=2, features=32, num_heads=4, mlp_dim=64,
                                           max_len=16, scan_layers=False)
        args = (_tokens((4, 8), vocab=20), _tokens((4, 6), vocab=20, seed=1),
                jnp.arange(8)[None] < jnp.array([[8], [5], [3], [7]]))
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), *args))["params"]

    def loss(params):
        return jnp.sum(jnp.sin(model.apply({"params": params}, *args)))

    results, dots = {}, {}
    for blocks in (1, 2):
        monkeypatch.setattr(transformer, "STACK_BLOCKS", blocks)
        results[blocks] = jax.jit(jax.value_and_grad(loss))(params)
        dots[blocks] = _dot_generals(lambda p: model.apply({"params": p}, *args), params)
    np.testing.assert_allclose(results[2][0], results[1][0], rtol=1e-5)
    # Sums in another order: equal to float32 rounding of each gradient's scale.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max())),
                 results[2][1], results[1][1])
    assert dots[2] > dots[1]  # the layers' dots once per block: the blocks are really there


def test_stack_blocks_run_each_layers_attention_in_one_block(monkeypatch):
    """In blocks, a stack's layers run attention whole per block (not halved again): the stack's
    dots exactly double, even where attention's own batch blocks are forced on."""
    stack = _stack(scan_layers=False, layers=2)
    x = jax.random.normal(jax.random.key(0), (4, 6, 16))
    variables = jax.jit(stack.init)(jax.random.key(1), x)
    counts = {}
    for blocks in (1, 2):
        monkeypatch.setattr(transformer, "STACK_BLOCKS", blocks)
        monkeypatch.setattr(transformer.attention_lib, "BATCH_BLOCKS", 1 if blocks == 1 else 2)
        counts[blocks] = _dot_generals(lambda x: stack.apply(variables, x), x)
    assert counts[2] == 2 * counts[1]


def test_stack_blocks_by_backend_devices_batch_and_decoding(monkeypatch):
    assert jax.device_count() == 8 and transformer.stack_blocks(32) == 1  # several devices: one block
    monkeypatch.setattr(jax, "device_count", lambda *a: 1)
    assert [transformer.stack_blocks(b) for b in (8, 15, 16, 17, 128)] == [1, 1, 2, 1, 2]
    monkeypatch.setattr(transformer, "STACK_BLOCKS", 4)
    assert transformer.stack_blocks(8) == 4 and transformer.stack_blocks(6) == 1  # forced, where it divides
    monkeypatch.setattr(transformer, "STACK_BLOCKS", 0)
    with pytest.raises(ValueError, match="STACK_BLOCKS must be None or a positive integer, got 0"):
        transformer.stack_blocks(8)
    # Decoding keeps one block (the KV cache holds the whole batch): cached steps equal the full forward.
    monkeypatch.setattr(transformer, "STACK_BLOCKS", 2)
    model = transformer.Tiny(vocab_size=40, scan_layers=False)
    tokens = _tokens((2, 6), vocab=40)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(1), tokens))["params"]
    cache = model.init(jax.random.key(0), tokens, decode=True)["cache"]
    logits, _ = model.apply({"params": params, "cache": cache}, tokens, decode=True, mutable=["cache"])
    np.testing.assert_allclose(logits, model.apply({"params": params}, tokens), rtol=1e-5, atol=1e-5)
