"""The Fréchet distance used for generated samples, against its textbook formula."""

import numpy as np
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
