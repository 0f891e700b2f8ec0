"""Residual networks (He et al. 2016): BasicBlock / Bottleneck, CIFAR ResNet-20/32/56, ImageNet ResNet-18/34/50.

BatchNorm keeps running statistics in the `batch_stats` collection (the train state's
`batch_stats` slot). Under `jit` the batch is one global array, so the statistics already
cover every device's examples; under `pmap` BatchNorm's `axis_name` is the pmap axis, so
they are averaged over devices and every replica keeps identical statistics.
"""

import functools
from typing import Any, Sequence

import einops
import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxml.models import _checks, conv, norm
from jaxml.models.dense import Dense
from jaxml.train import parallel

# He init with fan_out, as the paper (and torchvision) initialise convolutions.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
SHORTCUTS = ("projection", "zero_pad")
STEMS = ("imagenet", "cifar")


def _conv(features: int, kernel: int, strides: int, dtype) -> nn.Conv:
    """A bias-free conv (the BatchNorm after it has the offset) with logical axis names on its kernel."""
    pad = (kernel - 1) // 2  # explicit, so stride 2 halves exactly as in the paper (SAME shifts odd sizes)
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=((pad, pad), (pad, pad)),
                   use_bias=False, dtype=dtype, conv_general_dilated=conv.conv_general_dilated,
                   kernel_init=nn.with_logical_partitioning(_CONV_INIT, (None, None, "conv_in", "conv_out")))


def _relu(x):
    """relu written as a select, so that XLA computes each block's output once.

    `max(x, 0)` reads one full-size operand, so XLA's fusion pass may duplicate it (and, via
    the identity skips, the BatchNorm-add-relu of every earlier block) into each consumer:
    on CPU a ResNet-20 step recomputed its residual stream up to four blocks deep in its
    backward transposes. A select reads two (the mask and x), which XLA materialises once.
    Same values and gradients (0 at 0, as relu); ResNet-20's CPU step 0.76x, ResNet-50's 0.95x.
    """
    return jnp.where(x > 0, x, 0)


def _norm(train: bool, dtype, zero_scale: bool = False) -> norm.BatchNorm:
    # momentum 0.9 / eps 1e-5: torch's BatchNorm defaults, which the published numbers use.
    return norm.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                        axis_name=parallel.pmap_axis_name(),
                        scale_init=nn.initializers.zeros_init() if zero_scale else nn.initializers.ones_init())


class Shortcut(nn.Module):
    """The residual branch's skip: identity, or (when the shape changes) a projection or zero-padding."""

    features: int
    strides: int
    kind: str = "projection"  # projection: 1x1 conv + BN (option B); zero_pad: parameter-free (option A)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWxC: Float[Array, "B H W C"], train: bool) -> Float[Array, "B h w F"]:
        if self.strides == 1 and x_BxHxWxC.shape[-1] == self.features:
            return x_BxHxWxC
        if self.kind == "projection":
            y = _conv(self.features, 1, self.strides, self.dtype)(x_BxHxWxC)
            return _norm(train, self.dtype)(y)
        elif self.kind == "zero_pad":
            sub_BxhxwxC = x_BxHxWxC[:, ::self.strides, ::self.strides, :]
            extra = self.features - x_BxHxWxC.shape[-1]
            if extra < 0:
                raise ValueError(f"zero_pad shortcut cannot shrink channels: {x_BxHxWxC.shape[-1]} -> {self.features}")
            # Half the new channels on each side, as in the CIFAR ResNets of the paper's section 4.2.
            return jnp.pad(sub_BxhxwxC, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        raise ValueError(f"unknown shortcut {self.kind!r}; expected one of {SHORTCUTS}")


class BasicBlock(nn.Module):
    """conv3x3-BN-relu-conv3x3-BN, plus the shortcut, then relu (ResNet-18/34, CIFAR ResNets)."""

    features: int
    strides: int = 1
    shortcut: str = "projection"
    dtype: Any = jnp.float32

    expansion = 1  # output channels = features * expansion

    @nn.compact
    def __call__(self, x_BxHxWxC: Float[Array, "B H W C"], train: bool) -> Float[Array, "B h w F"]:
        y = _relu(_norm(train, self.dtype)(_conv(self.features, 3, self.strides, self.dtype)(x_BxHxWxC)))
        y = _norm(train, self.dtype)(_conv(self.features, 3, 1, self.dtype)(y))
        skip = Shortcut(self.features, self.strides, self.shortcut, self.dtype)(x_BxHxWxC, train)
        return _relu(y + skip)


class Bottleneck(nn.Module):
    """conv1x1-BN-relu-conv3x3(stride)-BN-relu-conv1x1(4x)-BN, plus the shortcut, then relu (ResNet-50)."""

    features: int
    strides: int = 1
    shortcut: str = "projection"
    dtype: Any = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x_BxHxWxC: Float[Array, "B H W C"], train: bool) -> Float[Array, "B h w F"]:
        out = self.features * self.expansion
        y = _relu(_norm(train, self.dtype)(_conv(self.features, 1, 1, self.dtype)(x_BxHxWxC)))
        # Stride on the 3x3 conv ("ResNet v1.5", torchvision): same parameters, better accuracy.
        y = _relu(_norm(train, self.dtype)(_conv(self.features, 3, self.strides, self.dtype)(y)))
        y = _norm(train, self.dtype)(_conv(out, 1, 1, self.dtype)(y))
        skip = Shortcut(out, self.strides, self.shortcut, self.dtype)(x_BxHxWxC, train)
        return _relu(y + skip)


class ResNet(nn.Module):
    """Stem, stages of residual blocks (channels width * 2^stage, stride 2 entering each later stage), pool, logits."""

    num_classes: int
    stage_sizes: Sequence[int]
    block: Any = BasicBlock  # BasicBlock or Bottleneck (the class itself)
    width: int = 64
    stem: str = "imagenet"  # imagenet: conv7x7/2 + maxpool3x3/2; cifar: conv3x3
    shortcut: str = "projection"
    dtype: Any = jnp.float32  # compute dtype; params and BatchNorm statistics stay float32

    @nn.compact
    def __call__(self, x_BxHxWxC: Float[Array, "B H W C"], train: bool) -> Float[Array, "B K"]:
        _checks.expect(self, x_BxHxWxC, "(batch, height, width, channels)", "float", "images")
        x = x_BxHxWxC.astype(self.dtype)
        if self.stem == "imagenet":
            x = _relu(_norm(train, self.dtype)(_conv(self.width, 7, 2, self.dtype)(x)))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        elif self.stem == "cifar":
            x = _relu(_norm(train, self.dtype)(_conv(self.width, 3, 1, self.dtype)(x)))
        else:
            raise ValueError(f"unknown stem {self.stem!r}; expected one of {STEMS}")
        for stage, num_blocks in enumerate(self.stage_sizes):
            for b in range(num_blocks):
                strides = 2 if stage > 0 and b == 0 else 1
                x = self.block(self.width * 2**stage, strides, self.shortcut, self.dtype)(x, train)
        pooled_BxC = einops.reduce(x, "b h w c -> b c", "mean")
        logits_BxK = Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "classes")))(pooled_BxC)
        return logits_BxK.astype(jnp.float32)  # the loss and softmax stay in float32


def _cifar(depth: int) -> functools.partial:
    """ResNet-depth for 32x32 inputs: 3 stages of (depth - 2) / 6 basic blocks, 16/32/64 channels, option A."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNets have depth 6n + 2 (20, 32, 44, 56, 110), got {depth}")
    n = (depth - 2) // 6
    return functools.partial(ResNet, stage_sizes=(n, n, n), block=BasicBlock, width=16, stem="cifar",
                             shortcut="zero_pad")


ResNet20 = _cifar(20)
ResNet32 = _cifar(32)
ResNet56 = _cifar(56)
ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck)
Tiny = functools.partial(ResNet, stage_sizes=(1, 1), block=BasicBlock, width=4, stem="cifar", shortcut="zero_pad")
