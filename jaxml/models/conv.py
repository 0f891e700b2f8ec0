"""2-D convolutions as XLA:CPU runs them fastest: a drop-in for `lax.conv_general_dilated`.

`nn.Conv(..., conv_general_dilated=conv.conv_general_dilated)` keeps the module's parameters
(an HWIO kernel, the same names and shapes) and changes only how the product is computed. On
GPU and TPU it is XLA's own convolution. On the CPU backend XLA runs convolutions through
Eigen's spatial convolution, while its matmuls reach the core's peak, so two cases become
matmuls:

- a 1x1 kernel is a matmul over channels (of the strided input): 1.5-2.5x faster than
  Eigen's convolution at ResNet-50's bottleneck shapes, forward and both gradients;
- a small output (at most `SMALL_OUTPUT` positions, e.g. 4x4) is one matmul of the stacked
  shifted inputs (im2col) with the flattened kernel: there the patches are small, and
  Eigen's convolution can be pathological (3x3, 512 channels on 2x2: 70 ms instead of 2.5).

Larger outputs keep XLA's convolution, which beats im2col there (the patch matrix is 9x
the input). Computing only the kernel's gradient as a matmul of channel-major patches (a
custom VJP) was tried: ResNet-20 ~9% faster per step for twice the temporaries, the LeNet
unchanged, so not kept. Measured per pass on a 2-core CPU in README "Benchmarks and performance".
"""

import jax
import jax.numpy as jnp
from jax import lax

SMALL_OUTPUT = 16  # output positions (H_out * W_out) up to which a KxK convolution is a matmul on CPU

_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def _is_nhwc(dimension_numbers) -> bool:
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return dimension_numbers == _NHWC
    return tuple(dimension_numbers) == ("NHWC", "HWIO", "NHWC")


def _explicit_padding(padding, in_hw, kernel_hw, strides):
    if isinstance(padding, str):
        return lax.padtype_to_pads(in_hw, kernel_hw, strides, padding)
    return [tuple(p) for p in padding]


def as_matmul(lhs_BxHxWxC, rhs_KhxKwxCxF, strides, pads):
    """The convolution as one matmul: the shifted (strided) views of the padded input stacked
    on the channel axis, times the kernel flattened to (Kh * Kw * C, F). For 1x1 kernels the
    view is the input itself."""
    kh, kw, c, f = rhs_KhxKwxCxF.shape
    b = lhs_BxHxWxC.shape[0]
    x = jnp.pad(lhs_BxHxWxC, ((0, 0), *pads, (0, 0))) if any(p != (0, 0) for p in pads) else lhs_BxHxWxC
    hp, wp = x.shape[1], x.shape[2]
    ho, wo = (hp - kh) // strides[0] + 1, (wp - kw) // strides[1] + 1
    views = [lax.slice(x, (0, i, j, 0), (b, i + (ho - 1) * strides[0] + 1, j + (wo - 1) * strides[1] + 1, c),
                       (1, strides[0], strides[1], 1))
             for i in range(kh) for j in range(kw)]
    patches_BxHoxWoxP = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
    return jnp.einsum("bhwp,pf->bhwf", patches_BxHoxWoxP, rhs_KhxKwxCxF.reshape(kh * kw * c, f))


def _output_positions(lhs_shape, rhs_shape, strides, pads) -> int:
    ho = (lhs_shape[1] + sum(pads[0]) - rhs_shape[0]) // strides[0] + 1
    wo = (lhs_shape[2] + sum(pads[1]) - rhs_shape[1]) // strides[1] + 1
    return ho * wo


def use_matmul(lhs_shape, rhs_shape, strides, pads) -> bool:
    """Whether the CPU formulation is a matmul for these shapes: 1x1 kernels, or small outputs."""
    return rhs_shape[0] == rhs_shape[1] == 1 or _output_positions(lhs_shape, rhs_shape, strides, pads) <= SMALL_OUTPUT


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
    """`lax.conv_general_dilated`, computed as a matmul on CPU where that is faster (module docstring)."""
    plain = (lhs.ndim == 4 and _is_nhwc(dimension_numbers) and feature_group_count == 1 and batch_group_count == 1
             and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
             and precision is None and preferred_element_type is None)
    if plain and jax.default_backend() == "cpu":
        strides = tuple(window_strides)
        pads = _explicit_padding(padding, lhs.shape[1:3], rhs.shape[:2], strides)
        if all(p >= 0 for pair in pads for p in pair) and use_matmul(lhs.shape, rhs.shape, strides, pads):
            return as_matmul(lhs, rhs, strides, pads)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                                    precision=precision, preferred_element_type=preferred_element_type)
