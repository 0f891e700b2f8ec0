"""TFDS builder of exactly generated sequence-to-sequence problems: multi-digit addition.

`addition`: "a+b" -> digits of a + b for 0 <= a, b < 1000, each problem once: the
10^6 pairs are permuted with a fixed seed, the first `train` go to train and the next `test`
to test, so test problems are never seen in training. Operands are zero-padded to 3 digits
and sums to 4, written least-significant digit first: digit i of the answer then always
sits at the same positions as the digits it depends on, and the carry flows in decoding
order (the usual tricks, e.g. Lee et al. 2023, "Teaching arithmetic to small transformers").
"""

import numpy as np
import tensorflow_datasets as tfds

PAD, BOS, EOS, PLUS = 0, 1, 2, 13
DIGIT0 = 3  # digits are tokens 3..12
VOCAB_SIZE = 14
MAX_DIGITS = 3
SOURCE_LEN = 2 * MAX_DIGITS + 1  # "999+999"
TARGET_LEN = MAX_DIGITS + 3  # BOS, up to 4 sum digits, EOS
_SEED = 0


def encode_problem(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) token rows for a + b: "007+012" -> BOS 9 1 0 0 EOS."""
    width = MAX_DIGITS
    source = [DIGIT0 + int(d) for d in f"{a:0{width}d}"] + [PLUS] + [DIGIT0 + int(d) for d in f"{b:0{width}d}"]
    target = [BOS] + [DIGIT0 + int(d) for d in reversed(f"{a + b:0{width + 1}d}")] + [EOS]
    pad = lambda xs, n: np.array(xs + [PAD] * (n - len(xs)), np.uint8)
    return pad(source, SOURCE_LEN), pad(target, TARGET_LEN)


def decode_sum(target_tokens) -> int | None:
    """The integer a target row (after BOS, up to EOS) spells, or None if it is not a number."""
    digits = []
    for t in list(target_tokens)[1:]:
        if t == EOS:
            break
        if not DIGIT0 <= t < DIGIT0 + 10:
            return None
        digits.append(str(int(t) - DIGIT0))
    return int("".join(reversed(digits))) if digits else None


class AdditionConfig(tfds.core.BuilderConfig):
    """How many problems go to train and to test."""

    def __init__(self, *, train: int, test: int, **kwargs):
        super().__init__(**kwargs)
        self.train, self.test = train, test


class Addition(tfds.core.GeneratorBasedBuilder):
    """a + b for a, b in [0, 1000): train and test are disjoint sets of problems."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "zero-padded operands, reversed 4-digit sums."}
    BUILDER_CONFIGS = [
        AdditionConfig(name="3digit", train=100_000, test=2_000, description="100k train / 2k test problems"),
        # Generating 100k examples takes minutes of a test's time; tests use this one.
        AdditionConfig(name="3digit_small", train=2_000, test=200, description="2k train / 200 test problems"),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description="Addition of two numbers below 1000, as token sequences.",
            features=tfds.features.FeaturesDict({
                "source": tfds.features.Tensor(shape=(SOURCE_LEN,), dtype=np.uint8),
                "target": tfds.features.Tensor(shape=(TARGET_LEN,), dtype=np.uint8),
            }),
            disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager  # generated, nothing to download
        pairs = np.random.RandomState(_SEED).permutation(10 ** (2 * MAX_DIGITS))  # legacy stream: fixed forever
        train, test = self.builder_config.train, self.builder_config.test
        return {"train": self._generate_examples(pairs[:train]), "test": self._generate_examples(pairs[train:train + test])}

    def _generate_examples(self, pairs):
        for i, p in enumerate(pairs):
            source, target = encode_problem(*divmod(int(p), 10 ** MAX_DIGITS))
            yield i, {"source": source, "target": target}
