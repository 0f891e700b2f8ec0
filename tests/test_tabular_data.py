"""The offline tabular TFDS builders: shapes, dtypes, fixed disjoint splits, values equal scikit-learn's."""

import numpy as np
import pytest
from sklearn import datasets as sk_datasets

from jaxml import data


@pytest.mark.parametrize("name,loader,num_features,target,sizes", [
    ("diabetes", sk_datasets.load_diabetes, 10, "target", (354, 88)),
    ("breast_cancer", sk_datasets.load_breast_cancer, 30, "label", (455, 114)),
])
def test_splits_are_fixed_disjoint_and_equal_sklearn(data_dir, name, loader, num_features, target, sizes):
    assert name in data.OFFLINE_DATASETS
    train = data.load_source(name, "train", data_dir, cache=True).arrays
    test = data.load_source(name, "test", data_dir, cache=True).arrays
    assert (len(train["features"]), len(test["features"])) == sizes
    assert train["features"].dtype == np.float32 and train["features"].shape[1:] == (num_features,)
    reference = loader()
    both = np.concatenate([train["features"], test["features"]])
    # Every sklearn row appears exactly once across the two splits (so they are disjoint).
    order = np.lexsort(both.T[::-1])
    ref_order = np.lexsort(reference.data.astype(np.float32).T[::-1])
    np.testing.assert_array_equal(both[order], reference.data.astype(np.float32)[ref_order])
    np.testing.assert_allclose(np.concatenate([train[target], test[target]])[order],
                               reference.target[ref_order].astype(np.float32))
    # The split is seeded: the first training row is always the same sklearn row.
    first = np.flatnonzero((reference.data.astype(np.float32) == train["features"][0]).all(1))
    assert first.tolist() == [int(np.random.RandomState(0).permutation(len(reference.data))[sizes[1]])]


def test_dataset_info(data_dir):
    assert data.dataset_info("breast_cancer", data_dir).num_classes == 2
    assert data.dataset_info("diabetes", data_dir).num_classes is None
    assert data.dataset_info("diabetes", data_dir).num_examples == {"train": 354, "test": 88}
