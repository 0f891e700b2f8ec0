"""End-to-end: the sequence experiments' tiny presets train, checkpoint and resume; the LM shards as configured."""

import json
import shutil
import types

import jax
import numpy as np

import pytest

from experiments import gpt, lstm, seq2seq, vit
from jaxml.train import loop


def _config(module, preset="tiny", **overrides):
    config = module.get_config(preset)
    for key, value in overrides.items():
        node = config
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    config.log.progress = False
    config.lock()
    return config


def _assert_trees_close(a, b, **tol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path), **tol)


def _resume_matches(module, tmp_path, preset="tiny", **overrides):
    full = loop.train(module, _config(module, preset, **overrides), str(tmp_path / "full"))
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / str(full.step))  # resume from the one before
    resumed = loop.train(module, _config(module, preset, **overrides), str(tmp_path / "resumed"))
    assert resumed.step == full.step
    _assert_trees_close(full.state.params, resumed.state.params, rtol=0, atol=0)
    assert resumed.eval_metrics == full.eval_metrics
    return full


def test_gpt_trains_checkpoints_resumes_and_reports(tmp_path):
    full = _resume_matches(gpt, tmp_path)
    assert np.isfinite(full.eval_metrics["eval/loss"])
    assert (tmp_path / "full" / "samples.txt").read_text().startswith("--- prompt")
    perf = json.loads((tmp_path / "full" / "perf.json").read_text())
    assert perf["flops_per_step"] > 0 and perf["unigram_nats_per_char"] > 0


def test_gpt_data_fsdp_and_data_tensor_meshes_match_single_device(tmp_path):
    overrides = {"train.steps": 3, "checkpoint.every_steps": 3}
    # The same experiment without its report (samples, FLOP count): only the numbers are compared.
    lm = types.SimpleNamespace(**{**vars(gpt), "report": None})
    one = loop.train(lm, _config(gpt, **overrides), str(tmp_path / "one"), devices=jax.devices()[:1])
    for mesh in (dict(data=2, fsdp=4), dict(data=2, tensor=4)):
        name = "x".join(mesh)
        sharded = loop.train(lm, _config(gpt, **overrides, **{f"parallel.mesh.{k}": v for k, v in mesh.items()}),
                             str(tmp_path / name))
        assert abs(one.eval_metrics["eval/loss"] - sharded.eval_metrics["eval/loss"]) < 1e-4, name
        _assert_trees_close(one.state.params, sharded.state.params, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("module,preset,metric", [(seq2seq, "tiny", "eval/exact_match"), (vit, "tiny", "eval/accuracy"),
                                                  (lstm, "tiny", "eval/bits_per_char"),
                                                  (lstm, "classify_tiny", "eval/accuracy")],
                         ids=["seq2seq", "vit", "lstm_lm", "lstm_classify"])
def test_experiment_trains_checkpoints_and_resumes(tmp_path, module, preset, metric):
    full = _resume_matches(module, tmp_path, preset)
    assert np.isfinite(full.eval_metrics[metric])
