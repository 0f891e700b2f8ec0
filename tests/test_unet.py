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


def test_bfloat16_compute_keeps_float32_params_and_output():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    t, y, context = jnp.array([0, 7]), jnp.array([3, 10]), jnp.ones((2, 3, 6))
    # One resolution (still with the middle attention block and cross-attention): quick to compile.
    nets = {d: unet.Tiny(num_classes=10, context_dim=6, channel_mults=(1,), attention_resolutions=(), dtype=d)
            for d in (jnp.float32, jnp.bfloat16)}
    shapes = jax.eval_shape(nets[jnp.bfloat16].init, jax.random.key(1), x, t, y, context)["params"]
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    # Random weights everywhere: the zero-initialised output conv would make both outputs exactly 0.
    # (numpy's generator: jax.random per leaf would compile a kernel for every shape.)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes)
    jaxpr = jax.make_jaxpr(lambda p: nets[jnp.bfloat16].apply({"params": p}, x, t, y, context))(params)
    convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert convs and dots and all(e.invars[0].aval.dtype == jnp.bfloat16 for e in convs + dots)
    half, full = (jax.jit(nets[d].apply)({"params": params}, x, t, y, context) for d in (jnp.bfloat16, jnp.float32))
    assert half.dtype == jnp.float32 and half.shape == x.shape and np.all(np.isfinite(half))
    # bfloat16 keeps 8 bits of mantissa: close to the float32 output, not equal to it.
    assert 0 < float(jnp.abs(half - full).max()) < 0.05 * float(jnp.abs(full).max())
