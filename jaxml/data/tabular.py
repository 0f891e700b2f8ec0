"""TFDS builders for scikit-learn's bundled tabular datasets: diabetes (regression), breast_cancer (binary).

Like `digits`, the data ships inside scikit-learn, so preparing needs no network and no
TensorFlow. Features are stored raw (unstandardised): experiments fit their scaling on the
train split only, so nothing about the test split leaks into training.
"""

import numpy as np
import tensorflow_datasets as tfds

_SPLIT_SEED = 0
_TEST_FRACTION = 0.2


def _split_order(num_examples: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded (train, test) partition of range(num_examples): 80 / 20."""
    # RandomState, not default_rng: numpy freezes the legacy stream (NEP 19), so every
    # machine and numpy version draws the same split.
    order = np.random.RandomState(_SPLIT_SEED).permutation(num_examples)
    num_test = int(round(num_examples * _TEST_FRACTION))
    return order[num_test:], order[:num_test]


def _checked(features_NxD: np.ndarray, num_examples: int, num_features: int, name: str) -> np.ndarray:
    if features_NxD.shape != (num_examples, num_features):
        raise ValueError(f"scikit-learn's {name}: expected features of shape {(num_examples, num_features)}, "
                         f"got {features_NxD.shape}")
    return features_NxD.astype(np.float32)


class Diabetes(tfds.core.GeneratorBasedBuilder):
    """442 patients, 10 baseline variables, target: disease progression after one year (regression)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "scikit-learn's load_diabetes (scaled features); seeded 354/88 train/test split."}
    NUM_EXAMPLES = 442
    NUM_FEATURES = 10

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: `dataset_info_from_configs` reads files jaxml does not keep.
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn's diabetes regression data: 442 examples, 10 features.",
            features=tfds.features.FeaturesDict({
                "features": tfds.features.Tensor(shape=(self.NUM_FEATURES,), dtype=np.float32),
                "target": tfds.features.Tensor(shape=(), dtype=np.float32),
            }),
            supervised_keys=("features", "target"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#diabetes-dataset",
            citation="Efron, Hastie, Johnstone and Tibshirani (2004), Least Angle Regression, Annals of Statistics.",
            disable_shuffling=True,  # the seeded permutation already shuffles
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data ships with scikit-learn
        train, test = _split_order(self.NUM_EXAMPLES)
        return {"train": self._generate_examples(train), "test": self._generate_examples(test)}

    def _generate_examples(self, indices):
        from sklearn import datasets as sk_datasets  # SciPy import: only when generating

        data = sk_datasets.load_diabetes()
        features_NxD = _checked(data.data, self.NUM_EXAMPLES, self.NUM_FEATURES, "diabetes")
        for position, i in enumerate(indices):  # keyed by position: written in this order
            yield position, {"features": features_NxD[i], "target": np.float32(data.target[i])}


class BreastCancer(tfds.core.GeneratorBasedBuilder):
    """569 tumours, 30 cell-nucleus measurements, label: 0 malignant, 1 benign (Wisconsin diagnostic)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "scikit-learn's load_breast_cancer; seeded 455/114 train/test split."}
    NUM_EXAMPLES = 569
    NUM_FEATURES = 30

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn's breast cancer Wisconsin (diagnostic) data: 569 examples, 30 features.",
            features=tfds.features.FeaturesDict({
                "features": tfds.features.Tensor(shape=(self.NUM_FEATURES,), dtype=np.float32),
                "label": tfds.features.ClassLabel(names=["malignant", "benign"]),
            }),
            supervised_keys=("features", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#breast-cancer-dataset",
            citation="Street, Wolberg and Mangasarian (1993), Nuclear feature extraction for breast tumor diagnosis.",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        train, test = _split_order(self.NUM_EXAMPLES)
        return {"train": self._generate_examples(train), "test": self._generate_examples(test)}

    def _generate_examples(self, indices):
        from sklearn import datasets as sk_datasets

        data = sk_datasets.load_breast_cancer()
        features_NxD = _checked(data.data, self.NUM_EXAMPLES, self.NUM_FEATURES, "breast_cancer")
        for position, i in enumerate(indices):
            yield position, {"features": features_NxD[i], "label": int(data.target[i])}
