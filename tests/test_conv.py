"""jaxml.models.conv: the CPU matmul formulations equal XLA's convolution, values and gradients,
and are chosen only where the module says (1x1 kernels, small outputs)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxml.models import conv, resnet

NHWC = ("NHWC", "HWIO", "NHWC")


def _primitives(fn, *args) -> list[str]:
    return [e.primitive.name for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns]


# (batch, side, in channels, out channels, kernel, stride, padding): 1x1 kernels (stride 1 and
# 2, ResNet-50's projections), small outputs under explicit, SAME and VALID padding, a 7x7 stem
# on a small image, 2x2 (ResNet-50's last stage at 64x64).
SMALL = [(2, 5, 3, 4, 1, 1, 0), (2, 5, 3, 4, 1, 2, 0), (2, 2, 8, 4, 3, 1, 1), (2, 4, 3, 4, 3, 2, 1),
         (3, 4, 6, 5, 3, 1, "SAME"), (2, 5, 4, 4, 3, 1, "VALID"), (2, 8, 3, 4, 7, 2, 3), (2, 7, 3, 4, 3, 2, "SAME")]


@pytest.mark.parametrize("b,side,c,f,k,s,pad", SMALL)
def test_matmul_formulation_equals_xla_convolution_and_its_gradients(b, side, c, f, k, s, pad):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, side, side, c)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, c, f)), jnp.float32)
    padding = pad if isinstance(pad, str) else ((pad, pad), (pad, pad))

    def ref(x, w):
        return lax.conv_general_dilated(x, w, (s, s), padding, dimension_numbers=NHWC)

    def ours(x, w):
        return conv.conv_general_dilated(x, w, (s, s), padding, dimension_numbers=NHWC)

    assert "conv_general_dilated" not in _primitives(ours, x, w)  # really the matmul path
    np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
    dy = jnp.asarray(rng.normal(size=ref(x, w).shape), jnp.float32)
    for got, want in zip(jax.vjp(ours, x, w)[1](dy), jax.vjp(ref, x, w)[1](dy)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_large_outputs_grouped_and_dilated_convolutions_stay_xla_convolutions():
    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    same = ((1, 1), (1, 1))
    assert "conv_general_dilated" in _primitives(  # 64 output positions > SMALL_OUTPUT
        lambda x, w: conv.conv_general_dilated(x, w, (1, 1), same, dimension_numbers=NHWC), x, w)
    assert "conv_general_dilated" in _primitives(
        lambda x, w: conv.conv_general_dilated(x, w, (1, 1), same, dimension_numbers=NHWC, feature_group_count=2),
        x[:2, :2, :2], w[..., :2, :])
    assert "conv_general_dilated" in _primitives(
        lambda x, w: conv.conv_general_dilated(x, w, (1, 1), same, rhs_dilation=(2, 2), dimension_numbers=NHWC),
        x[:, :3, :3], w)
    neg = ((-1, 0), (0, 0))  # negative padding crops: XLA's
    assert "conv_general_dilated" in _primitives(
        lambda x, w: conv.conv_general_dilated(x, w, (1, 1), neg, dimension_numbers=NHWC), x[:, :3, :2], w[:1, :1])
    x1 = jnp.ones((2, 8, 4))  # 1-D convolutions are left to XLA
    assert "conv_general_dilated" in _primitives(
        lambda x, w: conv.conv_general_dilated(x, w, (1,), ((1, 1),), dimension_numbers=("NWC", "WIO", "NWC")),
        x1, jnp.ones((3, 4, 4)))


def test_resnet50_on_cpu_computes_1x1_and_2x2_stage_convolutions_as_matmuls():
    """At 64x64 the 1x1 convolutions and the last stage's 3x3 ones on 2x2 (70 ms a pass in XLA:CPU's
    convolution) are matmuls; the earlier 3x3 convolutions on 16x16 and 8x8 stay convolutions.
    The parameters are nn.Conv's own, so checkpoints do not depend on the formulation."""
    model = resnet.ResNet50(num_classes=10)
    x = jnp.ones((1, 64, 64, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    prims = _primitives(lambda v: model.apply(v, x, train=False), variables)
    # 53 convolutions: the stem (7x7 to 32x32), 3x3 on 16x16 (3) and 8x8 (4) stay; 4x4 (6), 2x2 (3)
    # and all 36 1x1 (16 blocks x 2 + 4 projections, stride 2 included) become matmuls.
    assert prims.count("conv_general_dilated") == 1 + 3 + 4
    kernel = nn.meta.unbox(variables)["params"]["Bottleneck_15"]["Conv_1"]["kernel"]
    assert kernel.shape == (3, 3, 512, 512) and kernel.dtype == jnp.float32
