"""End to end: each experiment's tiny preset trains, writes its PNG, evaluates every test example once,
and a run resumed from a checkpoint ends with the same numbers as the uninterrupted one."""

import shutil

import jax
import numpy as np
import pytest

from experiments import linear, mlp, resnet
from jaxml.train import log, loop


def _config(experiment, preset, data_dir):
    config = experiment.get_config(preset)
    config.data.data_dir = data_dir
    config.log.progress = False
    config.lock()
    return config


def _assert_trees_equal(a, b):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("experiment,preset,png,num_test", [
    (linear, "tiny", "predicted_vs_true.png", 88),
    (linear, "tiny_breast_cancer", "roc_pr.png", 114),
    (mlp, "tiny", "confusion_matrix.png", 297),
    (resnet, "tiny", "confusion_matrix.png", 297),
])
def test_tiny_preset_runs_and_resumes_identically(tmp_path, data_dir, experiment, preset, png, num_test):
    full = loop.train(experiment, _config(experiment, preset, data_dir), str(tmp_path / "full"))
    assert (tmp_path / "full" / png).exists()
    # The test split is not a multiple of the eval batch (64): padding rows must not count.
    assert float(full.eval_sums["count"]) == num_test
    if "confusion" in full.eval_sums:
        assert float(full.eval_sums["confusion"].sum()) == num_test
    assert all(np.isfinite(v) for v in full.eval_metrics.values())
    # Derived metrics (F1, R^2, ROC AUC) are logged with every eval, from that split's sums.
    derived = experiment.eval_metrics(full_config := _config(experiment, preset, data_dir), full.eval_sums)
    assert derived and {f"eval/{k}" for k in derived} <= set(full.eval_metrics)
    for k, v in derived.items():
        assert full.eval_metrics[f"eval/{k}"] == pytest.approx(v, nan_ok=True)
    periodic = [r for r in log.read_metrics(str(tmp_path / "full")) if r["step"] < full.step]
    key = "val/" + next(iter(derived)) if full_config.data.validation_split or full_config.data.validation_fraction \
        else "eval/" + next(iter(derived))
    assert any(key in r for r in periodic), f"{key} missing from the periodic evals"
    # Resume from the second-to-last checkpoint: same final params, statistics and eval numbers.
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / str(full.step))
    resumed = loop.train(experiment, _config(experiment, preset, data_dir), str(tmp_path / "resumed"))
    assert resumed.step == full.step
    _assert_trees_equal(full.state.params, resumed.state.params)
    _assert_trees_equal(full.state.batch_stats, resumed.state.batch_stats)
    _assert_trees_equal(full.state.extra, resumed.state.extra)
    assert resumed.eval_metrics == pytest.approx(full.eval_metrics, rel=1e-6, abs=1e-7)
