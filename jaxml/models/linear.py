"""Linear models: linear regression, binary logistic regression, softmax (multinomial) regression.

Each is one `Dense` layer; they differ in what the output means, which the loss decides:
squared error for `LinearRegression`, sigmoid cross-entropy for `LogisticRegression`'s one
logit, softmax cross-entropy for `SoftmaxRegression`'s K logits.
"""

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxml.models import _checks
from jaxml.models.dense import Dense

# Zero init: the loss of a linear model is convex, so there is no symmetry to break, and
# zeros make the starting point (and every run) independent of the init seed.
_ZEROS = nn.initializers.zeros_init()


class LinearRegression(nn.Module):
    """y = x W + b with `num_targets` outputs."""

    num_targets: int = 1

    @nn.compact
    def __call__(self, x_BxD: Float[Array, "B D"]) -> Float[Array, "B T"]:
        _checks.expect(self, x_BxD, "(batch, features)", "real", "features")
        return Dense(self.num_targets, kernel_init=nn.with_logical_partitioning(_ZEROS, ("embed", None)))(
            x_BxD.astype(jnp.float32))


class LogisticRegression(nn.Module):
    """One logit per example: P(label = 1) = sigmoid(x w + b)."""

    @nn.compact
    def __call__(self, x_BxD: Float[Array, "B D"]) -> Float[Array, "B"]:
        _checks.expect(self, x_BxD, "(batch, features)", "real", "features")
        logit_Bx1 = Dense(1, kernel_init=nn.with_logical_partitioning(_ZEROS, ("embed", None)))(
            x_BxD.astype(jnp.float32))
        return logit_Bx1[:, 0]


class SoftmaxRegression(nn.Module):
    """K logits per example: P(label = k) = softmax(x W + b)_k."""

    num_classes: int

    @nn.compact
    def __call__(self, x_BxD: Float[Array, "B D"]) -> Float[Array, "B K"]:
        _checks.expect(self, x_BxD, "(batch, features)", "real", "features")
        return Dense(self.num_classes, kernel_init=nn.with_logical_partitioning(_ZEROS, ("embed", "classes")))(
            x_BxD.astype(jnp.float32))
