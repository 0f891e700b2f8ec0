"""MLP: shapes for every activation / norm / initializer, parameter count, errors, dropout and BatchNorm modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxml.models import mlp


def _count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("act", mlp.ACTIVATIONS)
@pytest.mark.parametrize("norm,scheme", [("none", "he"), ("layer", "glorot"), ("batch", "lecun")])
def test_output_shape_and_finite(act, norm, scheme):
    model = mlp.Tiny(num_outputs=3, activation=act, norm=norm, init_scheme=scheme)
    variables = model.init(jax.random.key(0), jnp.ones((4, 5)), train=False)
    out = model.apply(variables, jnp.ones((4, 5)), train=False)
    assert out.shape == (4, 3) and out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
    assert ("batch_stats" in variables) == (norm == "batch")


def test_parameter_count():
    params = jax.eval_shape(lambda: mlp.Classifier(num_outputs=10).init(jax.random.key(0), jnp.ones((1, 64)),
                                                                           train=False))["params"]
    assert _count(params) == 64 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10


def test_unknown_choices_fail_with_the_options():
    with pytest.raises(ValueError, match=r"unknown activation 'swish'.*relu"):
        mlp.MLP(num_outputs=2, activation="swish").init(jax.random.key(0), jnp.ones((1, 3)), train=False)
    with pytest.raises(ValueError, match=r"unknown initializer 'xavier'.*glorot"):
        mlp.MLP(num_outputs=2, init_scheme="xavier").init(jax.random.key(0), jnp.ones((1, 3)), train=False)
    with pytest.raises(ValueError, match=r"unknown norm 'group'"):
        mlp.MLP(num_outputs=2, norm="group").init(jax.random.key(0), jnp.ones((1, 3)), train=False)
    with pytest.raises(ValueError, match=r"flatten images first"):
        mlp.MLP(num_outputs=2).init(jax.random.key(0), jnp.ones((1, 8, 8, 1)), train=False)


def test_dropout_only_in_training_and_batchnorm_stats_only_update_in_training():
    model = mlp.Tiny(num_outputs=2, dropout=0.5, norm="batch")
    x = jax.random.normal(jax.random.key(1), (16, 5)) * 3 + 1
    variables = model.init(jax.random.key(0), x, train=False)
    a = model.apply(variables, x, train=False)
    np.testing.assert_array_equal(a, model.apply(variables, x, train=False))
    t1, updates = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"])
    t2, _ = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"])
    assert not np.allclose(t1, t2)  # different dropout masks
    before = variables["batch_stats"]["BatchNorm_0"]["mean"]
    assert not np.allclose(before, updates["batch_stats"]["BatchNorm_0"]["mean"])
