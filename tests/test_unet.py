"""The diffusion U-Net: output shape equals input shape at every configured resolution, conditioning works."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxml.models import unet


@pytest.mark.parametrize("size,mults", [(8, (1, 2)), (16, (1, 2, 2)), (32, (1, 1, 2, 2))])
def test_output_shape_equals_input_shape(size, mults):
    m = unet.Tiny(channel_mults=mults, attention_resolutions=(size // 2,), num_classes=10)
    x = jnp.ones((2, size, size, 3))
    t, y = jnp.array([0, 5]), jnp.array([1, 10])  # 10 = the "no class" index of guidance
    # Shapes only (no compile): eval_shape traces init and apply abstractly.
    variables = jax.eval_shape(lambda: m.init(jax.random.key(0), x, t, y))
    assert jax.eval_shape(lambda v: m.apply(v, x, t, y), variables).shape == x.shape


def test_cross_attention_context_changes_the_output():
    # The block alone: the full U-Net's zero-initialised output conv would hide the context at init.
    block = unet.AttentionBlock(num_heads=2)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    c1, c2 = jnp.zeros((2, 3, 6)), jnp.ones((2, 3, 6))
    apply = jax.jit(lambda v, c: block.apply(v, x, c))
    v = jax.jit(lambda: block.init(jax.random.key(1), x, c1))()
    out1, out2 = apply(v, c1), apply(v, c2)
    assert out1.shape == x.shape and not np.allclose(out1, out2)
    m = unet.Tiny(context_dim=6)  # and the U-Net threads the context through at every attention block
    t = jnp.array([3, 3])
    variables = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.ones((2, 8, 8, 1)), t, context_BxSxD=c1))
    assert jax.eval_shape(lambda v: m.apply(v, jnp.ones((2, 8, 8, 1)), t, context_BxSxD=c1), variables).shape == (2, 8, 8, 1)


def test_missing_conditioning_fails_loudly():
    m = unet.Tiny(num_classes=10)
    with pytest.raises(ValueError, match="needs labels"):
        jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)))


def test_timestep_embedding_distinguishes_levels():
    e = unet.timestep_embedding(jnp.arange(4), 16)
    assert e.shape == (4, 16) and np.linalg.matrix_rank(np.asarray(e)) == 4


def test_untrained_unet_predicts_exactly_zero():
    # experiments/diffusion.py samples "the untrained model" as a zero prediction: this is why that is exact.
    m = unet.Tiny(num_classes=10, channel_mults=(1,), attention_resolutions=())
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    t, y = jnp.array([0, 7]), jnp.array([3, 10])
    # An rbg key: the default (partitionable threefry) init compiles ~3x slower on CPU; any
    # random init must give the zero output.
    variables = jax.jit(m.init)(jax.random.key(1, impl="rbg"), x, t, y)
    assert any(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(variables))  # not all-zero params
    assert not np.any(np.asarray(jax.jit(m.apply)(variables, x, t, y)))
