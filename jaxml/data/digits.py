"""TFDS builder for scikit-learn's handwritten digits: jaxml's offline default image dataset.

The 1797 images ship inside scikit-learn, so preparing needs no network and no TensorFlow
(features are plain `Tensor`s, written as array_record by `jaxml.data.sources`).
"""

import numpy as np
import tensorflow_datasets as tfds

NUM_EXAMPLES = 1797
NUM_TRAIN = 1500  # the test split gets the remaining 297
_SPLIT_SEED = 0
_MAX_VALUE = 16  # sklearn's pixels are counts 0..16 of set bits in 4x4 blocks

_CITATION = """@misc{alpaydin1998optdigits,
  author = {Alpaydin, E. and Kaynak, C.},
  title = {Optical Recognition of Handwritten Digits},
  year = {1998},
  howpublished = {UCI Machine Learning Repository},
  doi = {10.24432/C50P49}
}"""


class Digits(tfds.core.GeneratorBasedBuilder):
    """8x8 grey images of the digits 0-9 (UCI optdigits test set) bundled with scikit-learn."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Pixels rescaled 0..16 -> 0..255; seeded 1500/297 train/test split."}

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly, not `dataset_info_from_configs`: that reads README/CITATIONS
        # files from this module's package directory, which jaxml does not keep.
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn's handwritten digits: 1797 8x8 grey images, 10 classes.",
            features=tfds.features.FeaturesDict({
                # Tensor, not Image: Image's encoder for numpy arrays needs TensorFlow.
                "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
            citation=_CITATION,
            # The seeded permutation below already shuffles; keep it as the on-disk order.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data ships with scikit-learn
        # RandomState, not default_rng: numpy freezes the legacy stream (NEP 19), so every
        # machine and numpy version draws the same split.
        order = np.random.RandomState(_SPLIT_SEED).permutation(NUM_EXAMPLES)
        return {
            "train": self._generate_examples(order[:NUM_TRAIN]),
            "test": self._generate_examples(order[NUM_TRAIN:]),
        }

    def _generate_examples(self, indices):
        # Imported here: scikit-learn loads SciPy (about 1 s), needed only when generating.
        from sklearn import datasets as sk_datasets

        digits = sk_datasets.load_digits()
        if digits.images.shape != (NUM_EXAMPLES, 8, 8):
            raise ValueError(f"scikit-learn's digits: expected images of shape {(NUM_EXAMPLES, 8, 8)}, "
                             f"got {digits.images.shape}")
        images_Nx8x8x1 = np.round(digits.images * 255 / _MAX_VALUE).astype(np.uint8)[..., None]
        # Keyed by position: with shuffling disabled TFDS writes in key order.
        for position, i in enumerate(indices):
            yield position, {"image": images_Nx8x8x1[i], "label": int(digits.target[i])}
