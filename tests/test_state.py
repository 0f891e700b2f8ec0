"""TrainState: creation, the optimizer update, the EMA slot, immutability."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxml.train.state import TrainState


def _params():
    return {"w": jnp.arange(4.0), "b": jnp.ones(())}


def test_create_and_apply_gradients_is_one_sgd_step():
    tx = optax.sgd(0.5)
    state = TrainState.create(_params(), tx)
    assert int(state.step) == 0 and state.ema_params is None and state.batch_stats is None
    grads = {"w": jnp.ones(4), "b": jnp.full((), 2.0)}
    new = state.apply_gradients(grads, tx)
    assert int(new.step) == 1
    np.testing.assert_allclose(new.params["w"], jnp.arange(4.0) - 0.5)
    np.testing.assert_allclose(new.params["b"], 0.0)
    np.testing.assert_allclose(state.params["w"], jnp.arange(4.0))  # the old state is untouched


def test_ema_follows_its_formula_over_steps():
    tx, decay = optax.sgd(1.0), 0.9
    state = TrainState.create(_params(), tx, ema_decay=decay)
    np.testing.assert_array_equal(state.ema_params["w"], state.params["w"])
    expected = np.arange(4.0)
    step = jax.jit(lambda s, g: s.apply_gradients(g, tx, ema_decay=decay))
    for _ in range(3):
        grads = {"w": jnp.ones(4), "b": jnp.zeros(())}
        state = step(state, grads)
        expected = decay * expected + (1 - decay) * np.asarray(state.params["w"])
    np.testing.assert_allclose(state.ema_params["w"], expected, rtol=1e-6)


def test_ema_decay_out_of_range_is_an_error():
    tx = optax.sgd(1.0)
    state = TrainState.create(_params(), tx, ema_decay=0.9)
    with pytest.raises(ValueError, match="ema_decay must be in \\(0, 1\\), got 0.0"):
        state.apply_gradients(jax.tree.map(jnp.zeros_like, state.params), tx)


def test_state_is_immutable_and_a_pytree():
    state = TrainState.create(_params(), optax.adam(1e-3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.step = 3
    leaves = jax.tree.leaves(state)
    assert len(leaves) == 1 + 2 + 5  # step, two params, adam count + mu(2) + nu(2)
