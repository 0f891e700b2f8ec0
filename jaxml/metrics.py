"""Metrics as sums over (masked) examples, so they add up correctly across eval batches."""

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def correct(logits_BxK: Float[Array, "B K"], labels_B: Int[Array, "B"]) -> Float[Array, "B"]:
    """1.0 where the arg-max class is the label."""
    return (jnp.argmax(logits_BxK, axis=-1) == labels_B).astype(jnp.float32)


def confusion_matrix(predictions_B: Int[Array, "B"], labels_B: Int[Array, "B"], num_classes: int,
                     mask_B: Float[Array, "B"] | None = None) -> Float[Array, "K K"]:
    """Counts with rows = true class, columns = predicted class; masked examples count 0."""
    true_BxK = (labels_B[:, None] == jnp.arange(num_classes)).astype(jnp.float32)
    pred_BxK = (predictions_B[:, None] == jnp.arange(num_classes)).astype(jnp.float32)
    if mask_B is not None:
        true_BxK = true_BxK * mask_B[:, None]
    return jnp.einsum("bt,bp->tp", true_BxK, pred_BxK)
