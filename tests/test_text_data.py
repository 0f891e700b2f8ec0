"""Text data: byte tokenizer round trip, window packing, the offline stdlib corpus builder and its splits."""

import numpy as np
import pytest

from jaxml import data
from jaxml.data import text


def test_tokenizer_round_trip_and_separator():
    s = "def f(x):\n    return 'é' * x\n"
    tokens = text.encode(s)
    assert tokens.dtype == np.uint8 and len(tokens) == len(s.encode())
    assert text.decode(tokens) == s
    assert text.decode(np.array([104, 0, 105])) == "hi"


def test_pack_windows_tiles_the_stream():
    docs = [np.arange(1, 8, dtype=np.uint8), np.arange(20, 25, dtype=np.uint8)]
    rows = text.pack_windows(docs, window=4)
    stream = np.concatenate([docs[0], [0], docs[1], [0]])
    assert rows.shape == (3, 5)
    np.testing.assert_array_equal(rows[:, 1:].ravel(), stream[1:13])  # every target once, in order
    np.testing.assert_array_equal(rows[1:, 0], rows[:-1, -1])  # one token of overlap
    with pytest.raises(ValueError, match="do not fill one window"):
        text.pack_windows([np.ones(3, np.uint8)], window=8)


def test_stdlib_split_is_deterministic_and_disjoint():
    a, b = text.stdlib_files(), text.stdlib_files()
    assert a == b and not set(a["train"]) & set(a["validation"])
    assert len(a["validation"]) * (text.VALIDATION_EVERY - 1) <= len(a["train"]) + text.VALIDATION_EVERY


def test_unigram_baseline_of_uniform_bytes_is_log_256():
    tokens = np.arange(256, dtype=np.uint8).repeat(10)
    assert text.unigram_entropy_nats(tokens) == pytest.approx(np.log(256), rel=1e-6)


def test_builder_windows_and_classification_splits(data_dir):
    train = data.load_source("text_windows/pystdlib_64", "train", data_dir, cache=True)
    val = data.load_source("text_windows/pystdlib_64", "validation", data_dir, cache=True)
    assert train.arrays["tokens"].shape[1] == 65 and len(train) > 4 * len(val) > 0
    assert "def " in text.decode(train.arrays["tokens"][:200].ravel())
    info = data.dataset_info("text_windows/pymodules_128", data_dir)
    assert info.num_classes == len(text.MODULE_CLASSES)
    labels = data.load_source("text_windows/pymodules_128", "train", data_dir, cache=True).arrays["label"]
    assert set(np.unique(labels)) == set(range(len(text.MODULE_CLASSES)))
