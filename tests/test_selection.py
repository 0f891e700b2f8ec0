"""Validation splits, early stopping with best-checkpoint restore, k-fold cross-validation."""

import json
import os

import jax
import numpy as np
import pytest

from experiments import cnn
from jaxml import data
from jaxml.train import log, loop, selection
from tests.test_engine import params_of, tiny_config


def test_validation_fraction_carves_the_end_of_train(data_dir):
    c = tiny_config(**{"data.validation_fraction": 0.1})
    splits = selection.resolve_splits(c.data)
    assert splits == selection.Splits("train[:1350]", "train[1350:]", "test")
    assert len(data.load_source("digits", splits.train)) == 1350
    assert len(data.load_source("digits", splits.validation)) == 150


@pytest.mark.parametrize("k", [3, 7])
def test_kfold_validation_parts_are_disjoint_and_cover_train_in_order(data_dir, k):
    c = tiny_config()
    full = data.load_source("digits", "train", cache=True)
    folds = selection.kfold_splits(c.data, k)
    assert len(folds) == k
    pieces = [data.load_source("digits", val, cache=True) for _, val in folds]
    # Concatenated in order, the validation parts are exactly the train split: disjoint and covering.
    np.testing.assert_array_equal(np.concatenate([p.arrays["image"] for p in pieces]), full.arrays["image"])
    np.testing.assert_array_equal(np.concatenate([p.arrays["label"] for p in pieces]), full.arrays["label"])
    for (train, _), piece in zip(folds, pieces):
        assert len(data.load_source("digits", train)) + len(piece) == len(full)


def test_kfold_rejects_bad_k():
    with pytest.raises(ValueError, match=r"eval.kfold must be in \[2, 1500\].*got 1"):
        selection.kfold_splits(tiny_config().data, 1)


def test_early_stopping_counts_patience_and_min_delta():
    es = selection.EarlyStopping(metric="val/loss", mode="min", patience=2, min_delta=0.1)
    assert es.update(10, {"val/loss": 1.0})
    assert not es.update(20, {"val/loss": 0.95})  # better, but not by more than min_delta
    assert not es.should_stop
    assert es.update(30, {"val/loss": 0.8})
    assert not es.update(40, {"val/loss": 0.9}) and not es.update(50, {"val/loss": 0.85})
    assert es.should_stop and es.best == 0.8 and es.best_step == 30
    up = selection.EarlyStopping(metric="val/accuracy", mode="max", patience=1, min_delta=0.0)
    assert up.update(1, {"val/accuracy": 0.5}) and up.update(2, {"val/accuracy": 0.6})
    assert not up.update(3, {"val/accuracy": 0.6}) and up.should_stop
    with pytest.raises(KeyError, match="val/acc.*not among.*val/accuracy"):
        selection.EarlyStopping("val/acc", "max", 1, 0.0).update(1, {"val/accuracy": 1.0})


def test_early_stopping_stops_restores_best_and_stays_stopped(tmp_path):
    # min_delta 10: nothing after the first eval counts as an improvement, so the run stops
    # at the second eval (patience 1) and ends with the state of the first.
    overrides = {"train.steps": 40, "train.eval_every": 4, "data.validation_fraction": 0.2,
                 "train.early_stopping.patience": 1, "train.early_stopping.min_delta": 10.0}
    result = loop.train(cnn, tiny_config(**overrides), str(tmp_path))
    assert result.step == 4
    assert os.listdir(tmp_path / "best") == ["4"]
    rows = log.read_metrics(str(tmp_path))
    assert max(r["step"] for r in rows if "train/loss" in r) == 8  # trained to the second eval only
    assert {"val/accuracy", "eval/accuracy"} <= set(result.eval_metrics)
    assert (tmp_path / "learning_curves.png").exists()
    again = loop.train(cnn, tiny_config(**overrides), str(tmp_path))  # a re-run does not train on
    assert again.step == 4
    for a, b in zip(jax.tree.leaves(params_of(result)), jax.tree.leaves(params_of(again))):
        np.testing.assert_array_equal(a, b)


def test_early_stopping_without_periodic_eval_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="train.eval_every.*early stopping needs periodic evals"):
        loop.train(cnn, tiny_config(**{"train.eval_every": 0, "train.early_stopping.patience": 2}), str(tmp_path))


def test_kfold_trains_each_fold_and_reports_mean_and_std(tmp_path):
    summary = selection.cross_validate(cnn, tiny_config(**{"eval.kfold": 3, "train.steps": 6}), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["fold_0", "fold_1", "fold_2", "kfold.json"]
    report = json.loads((tmp_path / "kfold.json").read_text())
    acc = report["metrics"]["val/accuracy"]
    assert report["k"] == 3 and len(acc["folds"]) == 3
    assert acc["mean"] == pytest.approx(np.mean(acc["folds"])) and acc["std"] == pytest.approx(np.std(acc["folds"]))
    assert summary["val/loss"]["mean"] > 0
    fold_config = json.loads((tmp_path / "fold_1" / "config.json").read_text())
    assert fold_config["data"]["validation_split"] == "train[500:1000]"
    assert fold_config["data"]["train_split"] == "train[:500]+train[1000:]"
