"""Metrics as sums over (masked) examples, so they add up correctly across eval batches."""

import jax.numpy as jnp
import numpy as np
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


# ---- classification: top-k, precision / recall / F1 ----------------------------------------

def top_k_correct(logits_BxK: Float[Array, "B K"], labels_B: Int[Array, "B"], k: int) -> Float[Array, "B"]:
    """1.0 where the label is among the k highest-scoring classes."""
    if not 1 <= k <= logits_BxK.shape[-1]:
        raise ValueError(f"top_k_correct: k must be in [1, {logits_BxK.shape[-1]}] (the number of classes), got {k}")
    # Rank of the label = how many classes score strictly higher; ties count in the label's favour.
    label_score_B = jnp.take_along_axis(logits_BxK, labels_B[:, None], axis=-1)[:, 0]
    higher_B = (logits_BxK > label_score_B[:, None]).sum(-1)
    return (higher_B < k).astype(jnp.float32)


def _safe_divide(numerator, denominator):
    """numerator / denominator, 0 where the denominator is 0 (sklearn's zero_division=0)."""
    return jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1), 0.0)


def precision_recall_f1(confusion_KxK: Float[Array, "K K"]) -> dict[str, jnp.ndarray]:
    """Per-class (`*_per_class`, shape K) and macro-averaged precision, recall and F1 from a confusion matrix.

    Rows are true classes, columns predicted ones (`confusion_matrix`'s layout); a class
    with no predictions (or no examples) gets precision (recall) 0, as sklearn's zero_division=0.
    """
    confusion_KxK = jnp.asarray(confusion_KxK, jnp.float32)
    if confusion_KxK.ndim != 2 or confusion_KxK.shape[0] != confusion_KxK.shape[1]:
        raise ValueError(f"precision_recall_f1 expects a square K x K confusion matrix, got {confusion_KxK.shape}")
    tp_K = jnp.diagonal(confusion_KxK)
    precision_K = _safe_divide(tp_K, confusion_KxK.sum(0))  # column sums: predicted as k
    recall_K = _safe_divide(tp_K, confusion_KxK.sum(1))  # row sums: truly k
    f1_K = _safe_divide(2 * precision_K * recall_K, precision_K + recall_K)
    return {"precision_per_class": precision_K, "recall_per_class": recall_K, "f1_per_class": f1_K,
            "precision": precision_K.mean(), "recall": recall_K.mean(), "f1": f1_K.mean()}


# ---- binary tasks: threshold-binned counts, ROC and precision-recall curves ----------------

def thresholds(num_thresholds: int = 200) -> Float[Array, "T"]:
    """Evenly spaced score thresholds in [0, 1]; score >= threshold counts as a positive prediction."""
    if num_thresholds < 2:
        raise ValueError(f"thresholds: need at least 2 thresholds, got {num_thresholds}")
    return jnp.linspace(0.0, 1.0, num_thresholds)


def binary_threshold_counts(scores_B: Float[Array, "B"], labels_B: Int[Array, "B"],
                            mask_B: Float[Array, "B"] | None = None,
                            num_thresholds: int = 200) -> dict[str, Float[Array, "T"]]:
    """TP / FP / TN / FN at each of `thresholds(num_thresholds)` for scores in [0, 1].

    Counts, not rates, so the arrays of many eval batches (and devices) simply add up; the
    curves and the AUC are computed once from the sums.
    """
    if scores_B.ndim != 1 or labels_B.shape != scores_B.shape:
        raise ValueError(f"binary_threshold_counts expects scores (B,) and labels (B,), got {scores_B.shape} "
                         f"and {labels_B.shape}")
    positive_BxT = (scores_B[:, None] >= thresholds(num_thresholds)[None, :]).astype(jnp.float32)
    weight_B = jnp.ones_like(scores_B, jnp.float32) if mask_B is None else mask_B.astype(jnp.float32)
    true_B = (labels_B == 1).astype(jnp.float32) * weight_B
    false_B = (labels_B != 1).astype(jnp.float32) * weight_B
    return {
        "tp": jnp.einsum("b,bt->t", true_B, positive_BxT),
        "fp": jnp.einsum("b,bt->t", false_B, positive_BxT),
        "fn": jnp.einsum("b,bt->t", true_B, 1.0 - positive_BxT),
        "tn": jnp.einsum("b,bt->t", false_B, 1.0 - positive_BxT),
    }


def roc_curve(tp_T, fp_T, tn_T, fn_T) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate) with rising FPR, from (0, 0) to (1, 1), as numpy."""
    tp_T, fp_T, tn_T, fn_T = (np.asarray(a, np.float64) for a in (tp_T, fp_T, tn_T, fn_T))
    tpr_T = np.divide(tp_T, tp_T + fn_T, out=np.zeros_like(tp_T), where=(tp_T + fn_T) > 0)
    fpr_T = np.divide(fp_T, fp_T + tn_T, out=np.zeros_like(fp_T), where=(fp_T + tn_T) > 0)
    # Thresholds rise, so the rates fall: reverse, and close the curve at both corners.
    fpr = np.concatenate([[0.0], fpr_T[::-1], [1.0]])
    tpr = np.concatenate([[0.0], tpr_T[::-1], [1.0]])
    return fpr, tpr


def roc_auc(tp_T, fp_T, tn_T, fn_T) -> float:
    """Area under the binned ROC curve (trapezoids); approaches the exact AUC as thresholds grow."""
    fpr, tpr = roc_curve(tp_T, fp_T, tn_T, fn_T)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def precision_recall_curve(tp_T, fp_T, tn_T, fn_T) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) per threshold, as numpy; thresholds with no positive prediction are dropped."""
    del tn_T  # precision and recall do not use it; the signature matches roc_curve
    tp_T, fp_T, fn_T = (np.asarray(a, np.float64) for a in (tp_T, fp_T, fn_T))
    predicted = (tp_T + fp_T) > 0
    precision = tp_T[predicted] / (tp_T + fp_T)[predicted]
    recall = np.divide(tp_T, tp_T + fn_T, out=np.zeros_like(tp_T), where=(tp_T + fn_T) > 0)[predicted]
    return precision, recall


def average_precision(tp_T, fp_T, tn_T, fn_T) -> float:
    """Sum over thresholds of precision x recall step (sklearn's step-wise definition), binned."""
    precision, recall = precision_recall_curve(tp_T, fp_T, tn_T, fn_T)
    # Falling recall as thresholds rise: each step down in recall is weighted by the precision there.
    recall_next = np.concatenate([recall[1:], [0.0]])
    return float(np.sum((recall - recall_next) * precision))


# ---- regression: sums that add across batches, and MSE / MAE / R^2 from them ---------------

def regression_sums(predictions_B: Float[Array, "B"], targets_B: Float[Array, "B"],
                    mask_B: Float[Array, "B"] | None = None) -> dict[str, jnp.ndarray]:
    """Masked sums of squared / absolute error, of the target and of its square (for R^2)."""
    if predictions_B.shape != targets_B.shape or predictions_B.ndim != 1:
        raise ValueError(f"regression_sums expects predictions (B,) and targets (B,), got {predictions_B.shape} "
                         f"and {targets_B.shape}")
    weight_B = jnp.ones_like(targets_B, jnp.float32) if mask_B is None else mask_B.astype(jnp.float32)
    residual_B = predictions_B.astype(jnp.float32) - targets_B.astype(jnp.float32)
    return {
        "squared_error": (residual_B**2 * weight_B).sum(),
        "absolute_error": (jnp.abs(residual_B) * weight_B).sum(),
        "target": (targets_B * weight_B).sum(),
        "target_squared": (targets_B**2 * weight_B).sum(),
    }


def regression_metrics(sums: dict, count) -> dict[str, float]:
    """MSE, MAE and R^2 = 1 - SS_res / SS_tot from `regression_sums` added over a split, as floats."""
    n = float(count)
    if n <= 0:
        raise ValueError(f"regression_metrics: count must be > 0, got {count}")
    # float64 on the host: SS_tot = sum(y^2) - sum(y)^2 / n cancels digits.
    ss_res = float(sums["squared_error"])
    ss_tot = float(sums["target_squared"]) - float(sums["target"]) ** 2 / n
    return {"mse": ss_res / n, "mae": float(sums["absolute_error"]) / n,
            "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")}
