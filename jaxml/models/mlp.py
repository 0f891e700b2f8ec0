"""Multi-layer perceptron: Dense -> [norm] -> activation -> dropout per hidden layer, then a Dense head."""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxml.models import _checks
from jaxml.models.dense import Dense
from jaxml.models.norm import BatchNorm
from jaxml.train import parallel

ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "sigmoid")
NORMS = ("none", "layer", "batch")
INITIALIZERS = ("glorot", "he", "lecun")


def activation(name: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """The activation function called `name`."""
    if name == "relu":
        return nn.relu
    elif name == "gelu":
        return nn.gelu
    elif name == "silu":
        return nn.silu
    elif name == "tanh":
        return jnp.tanh
    elif name == "sigmoid":
        return nn.sigmoid
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def initializer(name: str) -> Callable:
    """A kernel initializer: glorot (tanh/sigmoid), he (relu family) or lecun (selu, plain linear)."""
    if name == "glorot":
        return nn.initializers.glorot_uniform()
    elif name == "he":
        return nn.initializers.he_normal()
    elif name == "lecun":
        return nn.initializers.lecun_normal()
    raise ValueError(f"unknown initializer {name!r}; expected one of {INITIALIZERS}")


class MLP(nn.Module):
    """Hidden layers of `widths`, each Dense -> [LayerNorm | BatchNorm] -> activation -> dropout; logits out."""

    num_outputs: int
    widths: Sequence[int] = (256, 128)
    activation: str = "relu"
    dropout: float = 0.0
    norm: str = "none"  # none | layer | batch
    init_scheme: str = "he"  # glorot | he | lecun ("init" would shadow Module.init)
    dtype: Any = jnp.float32  # compute dtype; params stay float32

    @nn.compact
    def __call__(self, x_BxD: Float[Array, "B D"], train: bool) -> Float[Array, "B K"]:
        _checks.expect(self, x_BxD, "(batch, features)", "real", "features (flatten images first)")
        if self.norm not in NORMS:
            raise ValueError(f"MLP: unknown norm {self.norm!r}; expected one of {NORMS}")
        act, kernel_init = activation(self.activation), initializer(self.init_scheme)
        h_BxH = x_BxD.astype(self.dtype)
        for width in self.widths:
            # A norm right after Dense makes the Dense bias redundant (the norm's offset replaces it).
            h_BxH = Dense(width, use_bias=self.norm == "none", dtype=self.dtype,
                             kernel_init=nn.with_logical_partitioning(kernel_init, ("embed", "mlp")))(h_BxH)
            if self.norm == "layer":
                h_BxH = nn.LayerNorm(dtype=self.dtype)(h_BxH)
            elif self.norm == "batch":
                h_BxH = BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                                  axis_name=parallel.pmap_axis_name())(h_BxH)
            h_BxH = nn.Dropout(self.dropout, deterministic=not train)(act(h_BxH))
        logits_BxK = Dense(self.num_outputs, dtype=self.dtype, kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("mlp", "classes")))(h_BxH)
        return logits_BxK.astype(jnp.float32)  # the loss and softmax stay in float32


Classifier = functools.partial(MLP, widths=(256, 128), activation="relu", init_scheme="he")
Tiny = functools.partial(MLP, widths=(16,), activation="relu", init_scheme="he")
