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



def distillation(student_logits_BxK: Float[Array, "B K"], teacher_logits_BxK: Float[Array, "B K"],
                 labels_B: Int[Array, "B"], temperature: float = 4.0, alpha: float = 0.9) -> Float[Array, "B"]:
    """Knowledge distillation (Hinton et al. 2015): (1 - alpha) * CE(labels) + alpha * T^2 * KL(p_T^teacher || p_T^student).

    Both distributions are softened by `temperature`; the T^2 factor keeps the soft term's
    gradients on the scale of the hard term's as T changes. The teacher gets no gradient.
    """
    if student_logits_BxK.shape != teacher_logits_BxK.shape:
        raise ValueError(f"distillation: student logits {student_logits_BxK.shape} and teacher logits "
                         f"{teacher_logits_BxK.shape} must have the same shape")
    if temperature <= 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation: expected temperature > 0 and alpha in [0, 1], got {temperature}, {alpha}")
    hard_B = cross_entropy(student_logits_BxK, labels_B)
    teacher_BxK = jax.lax.stop_gradient(teacher_logits_BxK.astype(jnp.float32)) / temperature
    student_BxK = student_logits_BxK.astype(jnp.float32) / temperature
    p_teacher_BxK = jax.nn.softmax(teacher_BxK)
    kl_B = jnp.sum(p_teacher_BxK * (jax.nn.log_softmax(teacher_BxK) - jax.nn.log_softmax(student_BxK)), -1)
    return (1.0 - alpha) * hard_B + alpha * temperature**2 * kl_B
