"""Compile once: the engine traces an experiment's train step exactly once per run, across
steps, periodic evals, checkpoint saves and a restore (a retrace would recompile the step
and, on an accelerator, stall the run for the whole compile time).

A trace runs the step's Python body, so a counter in a wrapped train_step counts traces.
"""

import types

import numpy as np
import pytest

from experiments import cnn
from jaxml.train import loop
from tests.test_engine import assert_trees_close, params_of, tiny_config


def _counting_experiment():
    """The CNN experiment with a train_step that counts how often JAX traces it."""
    traces = []

    def train_step(config, state, batch, rng):
        traces.append(1)
        return cnn.train_step(config, state, batch, rng)

    exp = types.ModuleType("cnn_counting")
    exp.get_config, exp.init, exp.eval_step, exp.report = cnn.get_config, cnn.init, cnn.eval_step, None
    exp.train_step = train_step
    return exp, traces


@pytest.mark.slow  # three short runs of the tiny CNN: ~20 s of CPU time
def test_train_step_is_traced_once_across_steps_evals_and_a_restore(tmp_path):
    exp, traces = _counting_experiment()
    # A constant lr: the schedule then does not depend on train.steps, so 4 steps + 4 resumed
    # steps are the same run as 8 straight ones.
    overrides = {"train.eval_every": 4, "checkpoint.every_steps": 4, "optim.schedule": "constant",
                 "optim.warmup_steps": 0}
    straight = loop.train(exp, tiny_config(**overrides, **{"train.steps": 8}), str(tmp_path / "straight"))
    assert len(traces) == 1, f"train_step traced {len(traces)} times in one 8-step run with evals and saves"

    traces.clear()
    loop.train(exp, tiny_config(**overrides, **{"train.steps": 4}), str(tmp_path / "resumed"))
    traces.clear()
    # Restored from step 4: a restored state whose dtypes, weak types or shardings differed from
    # the step's own outputs would be traced once for the restored state and again after it.
    resumed = loop.train(exp, tiny_config(**overrides, **{"train.steps": 8}), str(tmp_path / "resumed"))
    assert len(traces) == 1, f"train_step traced {len(traces)} times in a run resumed from a checkpoint"
    # The batches placed one step ahead must not move the saved data position: the resumed run
    # sees the same batches as the straight one, so its numbers are identical.
    assert resumed.step == straight.step == 8
    assert_trees_close(params_of(resumed), params_of(straight), rtol=0, atol=0)
    np.testing.assert_equal(resumed.train_metrics["train/loss"], straight.train_metrics["train/loss"])
