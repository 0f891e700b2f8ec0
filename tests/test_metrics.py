"""Metrics against hand-computed values on small fixtures and against scikit-learn."""

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as sk

from jaxml import metrics


def test_top_k_correct_by_hand_and_against_sklearn():
    logits = jnp.array([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]])
    labels = jnp.array([2, 2, 0])
    np.testing.assert_array_equal(metrics.top_k_correct(logits, labels, 1), [0, 0, 0])
    np.testing.assert_array_equal(metrics.top_k_correct(logits, labels, 2), [1, 0, 0])
    np.testing.assert_array_equal(metrics.top_k_correct(logits, labels, 3), [1, 1, 1])
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(200, 10)).astype(np.float32), rng.integers(0, 10, 200)
    for k in (1, 3, 5):
        ours = float(metrics.top_k_correct(jnp.asarray(logits), jnp.asarray(labels), k).mean())
        assert ours == pytest.approx(sk.top_k_accuracy_score(labels, logits, k=k, labels=range(10)))
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\].*got 11"):
        metrics.top_k_correct(jnp.asarray(logits), jnp.asarray(labels), 11)


def test_precision_recall_f1_by_hand():
    # rows true, columns predicted: class 0: 2 right, 1 called 1; class 1: 1 right; class 2 never predicted.
    confusion = np.array([[2, 1, 0], [0, 1, 0], [1, 0, 0]], np.float32)
    out = metrics.precision_recall_f1(confusion)
    np.testing.assert_allclose(out["precision_per_class"], [2 / 3, 1 / 2, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out["recall_per_class"], [2 / 3, 1.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out["f1_per_class"], [2 / 3, 2 / 3, 0.0], rtol=1e-6)
    assert float(out["f1"]) == pytest.approx(4 / 9, rel=1e-6)


def test_precision_recall_f1_match_sklearn_from_batched_confusion():
    rng = np.random.default_rng(1)
    labels, predictions = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    predictions[:150] = labels[:150]  # better than chance
    # Three batches, the last padded with junk rows that the mask removes.
    confusion = sum(metrics.confusion_matrix(jnp.asarray(np.pad(predictions[s], (0, 28), constant_values=3)),
                                             jnp.asarray(np.pad(labels[s], (0, 28), constant_values=1)), 5,
                                             jnp.asarray(np.pad(np.ones(100), (0, 28))))
                    for s in (slice(0, 100), slice(100, 200), slice(200, 300)))
    out = metrics.precision_recall_f1(confusion)
    p, r, f, _ = sk.precision_recall_fscore_support(labels, predictions, zero_division=0)
    np.testing.assert_allclose(out["precision_per_class"], p, rtol=1e-5)
    np.testing.assert_allclose(out["recall_per_class"], r, rtol=1e-5)
    np.testing.assert_allclose(out["f1_per_class"], f, rtol=1e-5)
    assert float(out["f1"]) == pytest.approx(sk.f1_score(labels, predictions, average="macro"), rel=1e-5)


def test_threshold_counts_by_hand():
    counts = metrics.binary_threshold_counts(jnp.array([0.1, 0.6, 0.8, 0.3]), jnp.array([0, 1, 0, 1]),
                                             jnp.array([1.0, 1.0, 1.0, 0.0]), num_thresholds=3)  # 0, .5, 1
    np.testing.assert_array_equal(counts["tp"], [1, 1, 0])
    np.testing.assert_array_equal(counts["fp"], [2, 1, 0])
    np.testing.assert_array_equal(counts["fn"], [0, 0, 1])
    np.testing.assert_array_equal(counts["tn"], [0, 1, 2])


def test_binned_auc_from_summed_batches_matches_sklearn():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 1000)
    scores = 1 / (1 + np.exp(-(rng.normal(size=1000) + 1.5 * labels)))  # overlapping classes: AUC ~0.85
    batches = [metrics.binary_threshold_counts(jnp.asarray(scores[i:i + 256], jnp.float32), jnp.asarray(labels[i:i + 256]))
               for i in range(0, 1000, 256)]
    summed = {k: sum(b[k] for b in batches) for k in ("tp", "fp", "tn", "fn")}
    whole = metrics.binary_threshold_counts(jnp.asarray(scores, jnp.float32), jnp.asarray(labels))
    for k in summed:
        np.testing.assert_allclose(summed[k], whole[k])
    counts = [summed[k] for k in ("tp", "fp", "tn", "fn")]
    assert metrics.roc_auc(*counts) == pytest.approx(sk.roc_auc_score(labels, scores), abs=1e-2)
    assert metrics.average_precision(*counts) == pytest.approx(sk.average_precision_score(labels, scores), abs=2e-2)
    fpr, tpr = metrics.roc_curve(*counts)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0) and np.all(np.diff(fpr) >= 0)
    precision, recall = metrics.precision_recall_curve(*counts)
    assert recall[0] == 1.0 and precision[0] == pytest.approx(labels.mean())  # threshold 0: all positive


def test_perfect_and_inverted_scores_give_auc_1_and_0():
    labels = jnp.array([0, 0, 1, 1])
    good = metrics.binary_threshold_counts(jnp.array([0.1, 0.2, 0.8, 0.9]), labels)
    bad = metrics.binary_threshold_counts(jnp.array([0.9, 0.8, 0.2, 0.1]), labels)
    assert metrics.roc_auc(*(good[k] for k in ("tp", "fp", "tn", "fn"))) == pytest.approx(1.0)
    assert metrics.roc_auc(*(bad[k] for k in ("tp", "fp", "tn", "fn"))) == pytest.approx(0.0)


def test_regression_metrics_from_masked_sums_match_sklearn():
    rng = np.random.default_rng(3)
    targets = rng.normal(150, 70, 90).astype(np.float32)
    predictions = (targets + rng.normal(0, 50, 90)).astype(np.float32)
    sums = None
    for i in range(0, 90, 32):  # 32, 32, 26 + 6 padding rows of junk
        t, p = np.zeros(32, np.float32) + 1e3, np.zeros(32, np.float32) - 1e3
        n = min(32, 90 - i)
        t[:n], p[:n] = targets[i:i + n], predictions[i:i + n]
        out = metrics.regression_sums(jnp.asarray(p), jnp.asarray(t), jnp.asarray(np.arange(32) < n, jnp.float32))
        sums = out if sums is None else {k: sums[k] + out[k] for k in out}
    got = metrics.regression_metrics(sums, 90)
    assert got["mse"] == pytest.approx(sk.mean_squared_error(targets, predictions), rel=1e-5)
    assert got["mae"] == pytest.approx(sk.mean_absolute_error(targets, predictions), rel=1e-5)
    assert got["r2"] == pytest.approx(sk.r2_score(targets, predictions), abs=1e-4)
