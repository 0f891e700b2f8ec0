"""The one training loop every experiment uses (DESIGN.md section 3).

An experiment module defines `get_config()` and these functions, each taking the config
first (the loop binds it); one it does not need is set to None at module level:
  init(config, rng, batch) -> TrainState
  train_step(config, state, batch, rng) -> (state, metrics)   # metrics: flat dict of scalars
  eval_step(config, state, batch) -> sums                      # or None
  report(config, state, workdir, eval_sums) -> None            # or None; host side, process 0

`eval_step` returns *sums* over the real examples of the batch (`batch["mask"]` is 0 for
padding) and a `count`; the loop adds them over the whole split and logs each scalar sum
divided by the count as `eval/<name>`, so a partial last batch is weighted correctly.
"""

import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxml import config as config_lib
from jaxml import data as data_lib
from jaxml.train import checkpoint as ckpt_lib
from jaxml.train import log, parallel

PyTree = Any


class NonFiniteError(FloatingPointError):
    """A loss or gradient norm became NaN/Inf; the last good checkpoint is left as it was."""


@dataclasses.dataclass
class Result:
    """What a finished (or preempted) run hands back to a notebook or test."""

    state: PyTree  # the plain (unreplicated) final state
    step: int
    train_metrics: dict
    eval_metrics: dict
    eval_sums: dict | None
    preempted: bool


class _Preemption:
    """Turns SIGTERM into a flag the loop checks at each step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _host(metrics: dict) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def evaluate(placement, bound_eval_step, state, source, batch_size: int) -> tuple[dict, dict]:
    """One pass over `source`: (eval/<name> means, the raw summed arrays)."""
    sums = None
    for local in data_lib.eval_batches(source, global_batch_size=batch_size,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count()):
        out = placement.eval_step(state, placement.place_batch(local))
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = {k: np.asarray(v) for k, v in jax.device_get(sums).items()}
    count = float(sums["count"])
    means = {f"eval/{k}": float(v) / count for k, v in sums.items() if k != "count" and np.ndim(v) == 0}
    return means, sums


def train(experiment: types.ModuleType, config: ml_collections.ConfigDict, workdir: str,
          devices=None) -> Result:
    """Restore-or-init, then steps with eval, logging and checkpoints, then final eval and report."""
    _check_experiment(experiment)
    config_lib.validate(config)
    workdir = os.path.abspath(workdir)
    _check_writable(workdir)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2, default=str)

    # One seed split into named keys (DESIGN.md 8.6): init and the step rng are independent.
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    dc = config.data
    train_source = data_lib.load_source(dc.name, dc.train_split, dc.data_dir, cache=dc.cache)
    eval_source = data_lib.load_source(dc.name, dc.eval_split, dc.data_dir, cache=dc.cache) if experiment.eval_step is not None else None
    dataset = data_lib.train_dataset(train_source, global_batch_size=dc.batch_size, seed=dc.seed,
                                     process_index=jax.process_index(), process_count=jax.process_count(),
                                     num_workers=dc.num_workers)
    iterator = iter(dataset)
    example = next(iter(data_lib.train_dataset(train_source, global_batch_size=dc.batch_size, seed=dc.seed,
                                               process_index=jax.process_index(),
                                               process_count=jax.process_count())))

    bound_eval = functools.partial(experiment.eval_step, config) if eval_source is not None else None
    placement = parallel.setup(
        config.parallel, init_fn=functools.partial(experiment.init, config),
        train_step=functools.partial(experiment.train_step, config), eval_step=bound_eval,
        example_batch=example, global_batch_size=dc.batch_size, devices=devices)

    ckpt = ckpt_lib.Checkpointer(workdir, config.checkpoint)
    restored = ckpt.restore_latest(placement.abstract_state, iterator)
    if restored is None:
        state = placement.init(init_key, example)
        start = 0
    else:
        state, start, train_key = placement.place_state(restored.state), restored.step, restored.rng
        log.info(f"restored checkpoint at step {start} from {ckpt.directory}")

    writer = log.MetricWriter(workdir, tensorboard=config.log.tensorboard)
    total = config.train.steps
    progress = log.Progress(total, first_step=start) if config.log.progress else None
    window: list[dict] = []  # host metrics since the last log line
    last_train: dict = {}
    eval_metrics: dict = {}
    pending = None  # (step, device metrics): fetched one step late so the host never stalls the device
    preempted = False
    t_window, s_window = time.perf_counter(), start

    def drain():
        """Fetch the pending step's metrics, guard against NaN/Inf, and log."""
        nonlocal pending, t_window, s_window, last_train
        if pending is None:
            return
        step, metrics = pending
        pending = None
        host = _host(metrics)
        bad = {k: v for k, v in host.items() if not math.isfinite(v)}
        if bad:
            raise NonFiniteError(
                f"non-finite training metrics at step {step}: {bad}. The run stopped; the last good "
                f"checkpoint (step {ckpt.latest_step()}) in {ckpt.directory} is left untouched.")
        last_train = {f"train/{k}": v for k, v in host.items()}
        window.append(last_train)
        if progress is not None:
            progress.update(step, last_train)
        if step % config.train.log_every == 0 or step == total:
            now = time.perf_counter()
            row = {k: float(np.mean([w[k] for w in window])) for k in window[-1]}
            row["perf/steps_per_sec"] = (step - s_window) / max(now - t_window, 1e-9)
            t_window, s_window = now, step
            window.clear()
            writer.write(step, row)

    def run_eval(step):
        nonlocal eval_metrics
        eval_metrics, sums = evaluate(placement, bound_eval, state, eval_source, dc.eval_batch_size)
        writer.write(step, eval_metrics)
        log.info(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
        return sums

    try:
        with _Preemption() as preemption:
            for step in range(start, total):
                batch = placement.place_batch(next(iterator))
                state, metrics = placement.train_step(state, batch, train_key)
                drain()  # the previous step's metrics: ready by now, as this step was dispatched
                pending = (step + 1, metrics)
                done = step + 1
                stop = preemption.requested or ckpt.reached_preemption(done)
                if done % config.checkpoint.every_steps == 0 or done == total or stop:
                    drain()  # never save a state whose step produced NaN
                    ckpt.save(done, placement.plain_state(state), iterator.get_state(), train_key, config)
                if stop:
                    log.info(f"preemption requested: saved checkpoint at step {done}; exiting")
                    preempted = True
                    break
                if eval_source is not None and config.train.eval_every and done % config.train.eval_every == 0 \
                        and done != total:
                    drain()
                    run_eval(done)
            drain()
        final_step = int(jax.device_get(placement.plain_state(state).step))
        eval_sums = None
        if eval_source is not None and not preempted:
            eval_sums = run_eval(final_step)
        plain = placement.plain_state(state)
        if not preempted and experiment.report is not None and jax.process_index() == 0:
            experiment.report(config, plain, workdir, eval_sums)
    finally:
        if progress is not None:
            progress.close()
        ckpt.close()
        writer.close()
    return Result(state=plain, step=final_step, train_metrics=last_train, eval_metrics=eval_metrics,
                  eval_sums=eval_sums, preempted=preempted)


EXPERIMENT_FUNCTIONS = ("get_config", "init", "train_step", "eval_step", "report")


def _check_experiment(experiment) -> None:
    missing = [n for n in EXPERIMENT_FUNCTIONS if n not in vars(experiment)]
    if missing:
        raise TypeError(f"experiment {experiment.__name__} lacks {missing}: an experiment module defines "
                        f"{list(EXPERIMENT_FUNCTIONS)} (eval_step and report may be None)")


def _check_writable(workdir: str) -> None:
    """Fail at start, not after an hour of training, when the workdir cannot be written."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"workdir {workdir} is not writable: {e}") from e
