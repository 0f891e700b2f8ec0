"""Model-level tests of the CNN: shapes, parameter count, finiteness, conv rank, BatchNorm."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxml.models import cnn


def _params(model, x):
    return nn.unbox(model.init({"params": jax.random.key(0)}, x, train=False))


def test_lenet_shapes_and_parameter_count():
    model = cnn.LeNet(num_classes=10)
    x = jnp.zeros((3, 8, 8, 1))
    variables = _params(model, x)
    logits = model.apply(variables, x, train=False)
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    n = sum(p.size for p in jax.tree.leaves(variables["params"]))
    # conv 3x3x1x32 + 32, conv 3x3x32x64 + 64, dense (4*4*64)x128 + 128, dense 128x10 + 10
    assert n == (9 * 32 + 32) + (9 * 32 * 64 + 64) + (1024 * 128 + 128) + (128 * 10 + 10)


def test_one_dimensional_signals_use_1d_convolutions():
    model = cnn.Tiny(num_classes=3)
    x = jax.random.normal(jax.random.key(1), (2, 16, 5))  # (batch, time, channels)
    variables = _params(model, x)
    assert variables["params"]["Conv_0"]["kernel"].shape == (3, 5, 4)
    assert model.apply(variables, x, train=False).shape == (2, 3)


def test_wrong_input_rank_names_expected_shape():
    with pytest.raises(ValueError, match=r"\(batch, height, width, channels\).*got shape \(8, 8\)"):
        cnn.Tiny(num_classes=10).init(jax.random.key(0), jnp.zeros((8, 8)), train=False)


def test_dropout_only_in_training_and_outputs_finite():
    model = cnn.CNN(num_classes=10, features=(8,), dense=16, dropout=0.5)
    x = jax.random.uniform(jax.random.key(2), (4, 8, 8, 1))
    variables = _params(model, x)
    eval_a = model.apply(variables, x, train=False)
    eval_b = model.apply(variables, x, train=False)
    train_a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(3)})
    train_b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(4)})
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(train_a, train_b)
    assert np.isfinite(np.asarray(train_a)).all()


def test_batchnorm_statistics_update_in_training_only():
    model = cnn.CNN(num_classes=10, features=(4,), dense=8, batch_norm=True)
    x = jax.random.normal(jax.random.key(5), (8, 8, 8, 1)) * 3 + 1
    variables = _params(model, x)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
    before = variables["batch_stats"]["BatchNorm_0"]["mean"]
    after = updates["batch_stats"]["BatchNorm_0"]["mean"]
    assert not np.allclose(before, after)
    _, frozen = model.apply(variables, x, train=False, mutable=["batch_stats"])
    np.testing.assert_array_equal(frozen["batch_stats"]["BatchNorm_0"]["mean"], before)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = cnn.Tiny(num_classes=10, dtype=jnp.bfloat16)
    x = jnp.ones((2, 8, 8, 1))
    variables = _params(model, x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    assert model.apply(variables, x, train=False).dtype == jnp.float32


@pytest.mark.parametrize("shape", [(3, 8, 8, 5), (2, 7, 9, 4), (2, 11, 3)])
def test_max_pool_2x_equals_flax_max_pool_without_a_reduce_window(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    window = (2,) * (len(shape) - 2)
    ours, flax_pool = cnn.max_pool_2x, lambda v: nn.max_pool(v, window, strides=window)
    np.testing.assert_array_equal(ours(x), flax_pool(x))
    weights = jax.random.normal(jax.random.key(1), flax_pool(x).shape)  # distinct maxima: one gradient each
    np.testing.assert_array_equal(jax.grad(lambda v: (ours(v) * weights).sum())(x),
                                  jax.grad(lambda v: (flax_pool(v) * weights).sum())(x))
    assert "reduce-window" not in jax.jit(ours).lower(x).compile().as_text()
    assert "reduce-window" in jax.jit(flax_pool).lower(x).compile().as_text()  # the test can tell
