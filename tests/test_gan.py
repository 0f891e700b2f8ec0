"""DCGAN: the discriminator phase changes only D, the generator phase only G."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments import gan as gan_exp


def _changed(a, b) -> bool:
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_each_phase_updates_only_its_player():
    config = gan_exp.get_config("tiny")
    batch = {"image": np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)}
    state = jax.jit(lambda r: gan_exp.init(config, r, batch))(jax.random.key(0))
    real = gan_exp.to_model_space(batch["image"], 8)
    d_state, _ = jax.jit(lambda s: gan_exp.discriminator_update(config, s, real, jax.random.key(1)))(state)
    assert _changed(state.extra["d_params"], d_state.extra["d_params"])
    assert _changed(state.extra["d_opt_state"], d_state.extra["d_opt_state"])
    assert not _changed(state.params, d_state.params) and not _changed(state.opt_state, d_state.opt_state)
    g_state, _ = jax.jit(lambda s: gan_exp.generator_update(config, s, 8, jax.random.key(2)))(d_state)
    assert _changed(d_state.params, g_state.params) and _changed(d_state.opt_state, g_state.opt_state)
    assert not _changed(d_state.extra["d_params"], g_state.extra["d_params"])
    assert not _changed(d_state.extra["d_opt_state"], g_state.extra["d_opt_state"])
    assert int(g_state.step) == 1  # one D and one G update make one train step


def test_generator_and_discriminator_shapes():
    from jaxml.models import gan
    g, d = gan.Generator((16, 16, 3), (16, 8)), gan.Discriminator((8, 16))
    z = jnp.ones((2, 5))
    gv = jax.eval_shape(lambda: g.init(jax.random.key(0), z, train=False))
    images = jax.eval_shape(lambda v: g.apply(v, z, train=False), gv)
    assert images.shape == (2, 16, 16, 3)
    dv = jax.eval_shape(lambda: d.init(jax.random.key(0), jnp.ones((2, 16, 16, 3))))
    assert jax.eval_shape(lambda v: d.apply(v, jnp.ones((2, 16, 16, 3))), dv).shape == (2,)


def test_minibatch_stddev_lets_d_see_a_collapsed_batch():
    from jaxml.models import gan
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    collapsed = jnp.broadcast_to(x[:1], x.shape)  # every image a copy of the first: no variety
    for minibatch_std in (True, False):
        d = gan.Discriminator((8,), minibatch_std=minibatch_std)
        variables = d.init(jax.random.key(1), x)
        first, first_in_collapsed = d.apply(variables, x)[0], d.apply(variables, collapsed)[0]
        # The same first image is judged differently only when D sees the batch's spread.
        assert bool(first != first_in_collapsed) == minibatch_std
