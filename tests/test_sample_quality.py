"""The Fréchet distance used for generated samples, against its textbook formula."""

import numpy as np
import pytest
import scipy.linalg

from jaxml import sample_quality


def test_frechet_distance_matches_the_formula_and_is_zero_for_identical_sets():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(loc=0.5, size=(300, 6)) @ rng.normal(size=(6, 6))
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = np.real(scipy.linalg.sqrtm(ca @ cb))
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca + cb - 2 * covmean)
    assert abs(sample_quality.frechet_distance(a, b) - expected) < 1e-4 * expected
    assert abs(sample_quality.frechet_distance(a, a)) < 1e-4


def test_class_coverage_counts_classes_and_entropy():
    collapsed = sample_quality.class_coverage(np.full(100, 3))
    assert collapsed["classes_present"] == 1 and collapsed["class_entropy_bits"] == 0.0
    assert collapsed["class_histogram"][3] == 100
    uniform = sample_quality.class_coverage(np.repeat(np.arange(10), 50))
    assert uniform["classes_present"] == uniform["classes_at_least_2pct"] == 10
    np.testing.assert_allclose(uniform["class_entropy_bits"], np.log2(10))
    rare = sample_quality.class_coverage(np.concatenate([np.zeros(99, int), [7]]))  # one stray sample of 7
    assert rare["classes_present"] == 2 and rare["classes_at_least_2pct"] == 1


def test_class_coverage_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"class indices in \[0, 10\).*range \[0, 12\]"):
        sample_quality.class_coverage(np.array([0, 12]))
