"""RNN: fused cells == Flax's reference cells, masking ignores padding, stack/bidirectional shapes, heads."""

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from jaxml.models import rnn


def test_lstm_cell_equals_flax_lstm_cell():
    x_BxC = jax.random.normal(jax.random.key(0), (3, 5))
    ref = nn.LSTMCell(features=4)
    carry = (jax.random.normal(jax.random.key(1), (3, 4)), jax.random.normal(jax.random.key(2), (3, 4)))
    p = ref.init(jax.random.key(3), carry, x_BxC)["params"]
    gates = ("i", "f", "g", "o")
    ours = {"input_kernel": jnp.concatenate([p[f"i{g}"]["kernel"] for g in gates], 1),
            "recurrent_kernel": jnp.concatenate([p[f"h{g}"]["kernel"] for g in gates], 1),
            "bias": jnp.concatenate([p[f"h{g}"]["bias"] for g in gates])}
    (c1, h1), _ = ref.apply({"params": p}, carry, x_BxC)
    (c2, h2), _ = rnn.LSTMCell(4).apply({"params": ours}, carry, x_BxC)
    np.testing.assert_allclose(c2, c1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h2, h1, rtol=1e-5, atol=1e-6)


def test_gru_cell_equals_flax_gru_cell():
    x_BxC = jax.random.normal(jax.random.key(0), (3, 5))
    ref = nn.GRUCell(features=4)
    h = jax.random.normal(jax.random.key(1), (3, 4))
    p = ref.init(jax.random.key(3), h, x_BxC)["params"]
    p = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(4), a.shape), p)  # non-zero biases
    gates = ("r", "z", "n")
    ours = {"input_kernel": jnp.concatenate([p[f"i{g}"]["kernel"] for g in gates], 1),
            "input_bias": jnp.concatenate([p[f"i{g}"]["bias"] for g in gates]),
            "recurrent_kernel": jnp.concatenate([p[f"h{g}"]["kernel"] for g in gates], 1),
            "recurrent_bias_n": p["hn"]["bias"]}
    h1, _ = ref.apply({"params": p}, h, x_BxC)
    h2, _ = rnn.GRUCell(4).apply({"params": ours}, h, x_BxC)
    np.testing.assert_allclose(h2, h1, rtol=1e-5, atol=1e-6)


def test_classifier_ignores_padding_and_accepts_signals():
    tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, 20)
    lengths = jnp.array([7, 4])
    model = rnn.TinyClassifier(num_classes=3, vocab_size=20, cell="gru")
    variables = jax.jit(model.init)(jax.random.key(1), tokens, lengths)
    apply = jax.jit(model.apply)
    other = tokens.at[1, 4:].set(0)
    np.testing.assert_allclose(apply(variables, tokens, lengths), apply(variables, other, lengths), rtol=1e-5,
                               atol=1e-6)
    signals = rnn.TinyClassifier(num_classes=3, num_layers=2)
    out = jax.eval_shape(lambda: signals.apply(signals.init(jax.random.key(0), jnp.ones((2, 9, 3))), jnp.ones((2, 9, 3))))
    assert out.shape == (2, 3)


def test_char_lm_is_causal_and_shaped():
    model = rnn.TinyLM(vocab_size=30)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 30)
    variables = jax.jit(model.init)(jax.random.key(1), tokens)
    apply = jax.jit(model.apply)
    a, b = apply(variables, tokens), apply(variables, tokens.at[:, 5:].set(1))
    assert a.shape == (2, 9, 30)
    np.testing.assert_array_equal(a[:, :5], b[:, :5])
