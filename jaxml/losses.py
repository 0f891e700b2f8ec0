"""Pure loss functions: per-example values, reduced by the caller (so masks and sums compose)."""

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int


def cross_entropy(logits_BxK: Float[Array, "B K"], labels_B: Int[Array, "B"],
                  label_smoothing: float = 0.0) -> Float[Array, "B"]:
    """Softmax cross-entropy against integer labels, computed in float32."""
    if logits_BxK.ndim != 2 or labels_B.shape != logits_BxK.shape[:1]:
        raise ValueError(f"cross_entropy expects logits (B, K) and labels (B,), got {logits_BxK.shape} "
                         f"and {labels_B.shape}")
    logits_BxK = logits_BxK.astype(jnp.float32)
    if label_smoothing == 0.0:
        return optax.softmax_cross_entropy_with_integer_labels(logits_BxK, labels_B)
    num_classes = logits_BxK.shape[-1]
    targets_BxK = optax.smooth_labels(jax.nn.one_hot(labels_B, num_classes), label_smoothing)
    return optax.softmax_cross_entropy(logits_BxK, targets_BxK)

