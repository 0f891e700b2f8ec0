"""jaxml's packed views of TFDS text datasets (imdb_reviews, tiny_shakespeare), end to end.

Those datasets cannot be downloaded here (and TFDS needs TensorFlow to parse their
archives), so each test writes a small prepared copy with TFDS's own builder class of that
dataset: its real features, file format and reader; only the examples are the test's own.
Then jaxml's `text_windows` builder packs it, and the experiments train on it.
"""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import gpt, lstm
from jaxml import data
from jaxml.data import text
from jaxml.train import loop


def _prepare(name: str, data_dir: str, monkeypatch, splits: dict) -> None:
    """Writes `splits` ({split: [example dict]}) as a prepared array_record copy of TFDS dataset `name`."""
    builder = tfds.builder(name, data_dir=data_dir, file_format=tfds.core.FileFormat.ARRAY_RECORD)
    monkeypatch.setattr(type(builder), "_split_generators", lambda self, dl_manager: {
        split: ((f"{split}-{i}", ex) for i, ex in enumerate(examples)) for split, examples in splits.items()})
    builder.download_and_prepare()
    monkeypatch.undo()


def _review(label: str, i: int) -> bytes:
    words = "a great, moving film" if label == "pos" else "a dull, tedious film"
    return f"Review {i}: {words}. ".encode() * (1 + 7 * i)  # 24 .. ~1400 bytes: some truncated at 512


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tfds_text"))
    with pytest.MonkeyPatch.context() as mp:
        _prepare("imdb_reviews", directory, mp, {
            split: [{"text": _review(label, i), "label": label} for i in range(n) for label in ("neg", "pos")]
            for split, n in (("train", 24), ("test", 10))})
        play = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 60).encode()
        _prepare("tiny_shakespeare", directory, mp, {
            "train": [{"text": play}], "validation": [{"text": play[:2000]}], "test": [{"text": play[:1000]}]})
    return directory


def test_imdb_view_truncates_pads_and_keeps_labels(text_dir):
    train = data.load_source("text_windows/imdb_reviews_512", "train", data_dir=text_dir, cache=True).arrays
    assert train["tokens"].shape == (48, 512) and train["tokens"].dtype == np.uint8
    original = {_review(label, i): label == "pos" for i in range(24) for label in ("neg", "pos")}
    seen = set()
    for tokens, length, label in zip(train["tokens"], train["length"], train["label"]):
        review = next(r for r in original if r[:length] == tokens[:length].tobytes() and len(r[:512]) == length)
        assert original[review] == bool(label)
        assert not tokens[length:].any()  # zero padding after the review's bytes
        seen.add(review)
    assert len(seen) == 48  # every review once
    assert max(train["length"]) == 512 and min(train["length"]) < 512
    info = data.dataset_info("text_windows/imdb_reviews_512", text_dir)
    assert info.num_classes == 2 and info.num_examples == {"train": 48, "test": 20}


def test_shakespeare_view_packs_lm_windows(text_dir):
    val = data.load_source("text_windows/tiny_shakespeare_64", "validation", data_dir=text_dir, cache=True).arrays
    assert val["tokens"].shape[1] == 65
    assert text.decode(val["tokens"][0]).startswith("First Citizen:")


def test_lstm_imdb_preset_trains_with_masked_padding(tmp_path, text_dir):
    config = lstm.get_config("imdb")
    config.update_from_flattened_dict({"data.data_dir": text_dir, "model.hidden": 8, "model.embed": 8,
                                       "data.batch_size": 8, "data.eval_batch_size": 16, "train.steps": 4,
                                       "train.eval_every": 0, "checkpoint.every_steps": 4, "log.progress": False,
                                       "optim.warmup_steps": 1})
    result = loop.train(lstm, config, str(tmp_path))
    assert float(result.eval_sums["count"]) == 20
    assert np.isfinite(result.eval_metrics["eval/loss"])
    # The padding is masked: a review's logits do not depend on the bytes after its length.
    batch = data.load_source("text_windows/imdb_reviews_512", "test", data_dir=text_dir, cache=True).gather(range(4))
    garbage = dict(batch, tokens=np.where(np.arange(512) < batch["length"][:, None], batch["tokens"], 77))
    apply = lambda b: lstm.model(config).apply({"params": result.state.params}, *lstm._inputs(config, b))
    np.testing.assert_allclose(apply(batch), apply(garbage), rtol=1e-6, atol=1e-6)


def test_gpt_shakespeare_preset_trains(tmp_path, text_dir):
    config = gpt.get_config("shakespeare")
    config.update_from_flattened_dict({"data.data_dir": text_dir, "data.name": "text_windows/tiny_shakespeare_64",
                                       "model.num_layers": 1, "model.features": 16, "model.num_heads": 2,
                                       "model.mlp_dim": 32, "model.max_len": 64, "data.batch_size": 8, "data.eval_batch_size": 16,
                                       "train.steps": 3, "train.eval_every": 0, "checkpoint.every_steps": 3, "optim.warmup_steps": 1,
                                       "sample.num": 2, "sample.length": 24,
                                       "log.progress": False})
    result = loop.train(gpt, config, str(tmp_path))
    assert np.isfinite(result.eval_metrics["eval/loss"])
