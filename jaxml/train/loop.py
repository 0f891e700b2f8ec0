"""The one training loop every experiment uses (DESIGN.md section 3).

An experiment module defines `get_config()` and these functions, each taking the config
first (the loop binds it); one it does not need is set to None at module level:
  init(config, rng, batch) -> TrainState
  train_step(config, state, batch, rng) -> (state, metrics)   # metrics: flat dict of scalars
  eval_step(config, state, batch) -> sums                      # or None
  report(config, state, workdir, eval_sums) -> None            # or None; host side, process 0
and optionally
  eval_metrics(config, eval_sums) -> {name: float}             # host side, derived metrics

`eval_step` returns *sums* over the real examples of the batch (`batch["mask"]` is 0 for
padding) and a `count`; the loop adds them over the whole split and logs each scalar sum
divided by the count, so a partial last batch is weighted correctly: `val/<name>` on the
validation split (periodic evals and early stopping, when there is one), `eval/<name>` on
the test split. Metrics that are not means of per-example values (F1 from a summed confusion
matrix, ROC AUC from threshold counts, R^2) come from the optional `eval_metrics`, computed
from the split's sums after every eval and logged under the same prefixes (so early stopping
can watch `val/f1`). `report` gets the summed arrays of the final test eval.
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
from jaxml import plots, transfer
from jaxml.train import checkpoint as ckpt_lib
from jaxml.train import log, parallel, selection
from jaxml.train import workdir as workdir_lib

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
        # Multi-host: JAX's preemption notifier owns SIGTERM and `reached_preemption` makes
        # every host stop at the same step; a Python handler here would hide it from JAX.
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _host(metrics: dict) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


class BatchSpec:
    """The keys, shapes and dtypes of the batches a step was compiled for (the first one seen);
    `check` names the key of a later batch that differs, host side, before it reaches the step
    (where it would silently recompile, or fail deep inside XLA)."""

    def __init__(self, what: str, reference=None):
        self.what, self.spec = what, None if reference is None else self._of(reference)

    @staticmethod
    def _of(batch) -> dict:
        leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
        return {jax.tree_util.keystr(k): f"shape {tuple(np.shape(v))} {np.result_type(v).name}" for k, v in leaves}

    def check(self, batch):
        got = self._of(batch)
        if self.spec is None:
            self.spec = got
        elif got != self.spec:
            diff = [f"{k}: expected {self.spec.get(k, 'no such key')}, got {got.get(k, 'no such key')}"
                    for k in sorted(set(got) | set(self.spec)) if got.get(k) != self.spec.get(k)]
            raise ValueError(f"this {self.what} batch differs from the first one, which the {self.what} step was "
                             f"compiled for: " + "; ".join(diff))
        return batch


def evaluate(placement, state, source, batch_size: int, prefix: str, summarize=None,
             spec: BatchSpec | None = None) -> tuple[dict, dict]:
    """One pass over `source`: (`<prefix>/<name>` means and `summarize(sums)`, the raw summed arrays)."""
    sums = None
    spec = spec or BatchSpec("eval")  # eval batches are padded to one shape, the train batch's or not
    rows = parallel.process_rows(placement.mesh, batch_size, placement.mode, key="data.eval_batch_size")
    for local in data_lib.eval_batches(source, global_batch_size=batch_size, rows=rows):
        out = placement.eval_step(state, placement.place_batch(spec.check(local)))
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = {k: np.asarray(v) for k, v in jax.device_get(sums).items()}
    count = float(sums["count"])
    means = {f"{prefix}/{k}": float(v) / count for k, v in sums.items() if k != "count" and np.ndim(v) == 0}
    if summarize is not None:
        means.update({f"{prefix}/{k}": float(v) for k, v in summarize(sums).items()})
    return means, sums


def train(experiment: types.ModuleType, config: ml_collections.ConfigDict, workdir: str,
          devices=None) -> Result:
    """Restore-or-init, then steps with eval, logging and checkpoints, then final eval and report."""
    _check_experiment(experiment)
    config_lib.validate(config)
    workdir = os.path.abspath(workdir)
    workdir_lib.check_writable(workdir)
    with workdir_lib.Lock(workdir):
        return _train(experiment, config, workdir, devices)


def _train(experiment, config, workdir, devices) -> Result:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2, default=str)

    # One seed split into named keys (DESIGN.md 8.6): init and the step rng are independent.
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    dc = config.data
    splits = selection.resolve_splits(dc)
    load = functools.partial(data_lib.load_source, dc.name, data_dir=dc.data_dir, cache=dc.cache)
    train_source = load(splits.train)
    has_eval = experiment.eval_step is not None
    test_source = load(splits.test) if has_eval else None
    val_source = load(splits.validation) if has_eval and splits.validation else None
    # Periodic evals (and early stopping) look at the validation split when there is one.
    periodic_source, periodic_prefix = (val_source, "val") if val_source is not None else (test_source, "eval")
    # Each process reads the rows of the global batch its devices hold (jaxml.data.pipeline).
    shard = dict(rows=parallel.process_rows(parallel.make_mesh(config.parallel, devices), dc.batch_size,
                                            config.parallel.mode))
    iterator = iter(data_lib.train_dataset(train_source, global_batch_size=dc.batch_size, seed=dc.seed,
                                           num_workers=dc.num_workers, **shard))
    example = next(iter(data_lib.train_dataset(train_source, global_batch_size=dc.batch_size, seed=dc.seed,
                                               **shard)))
    train_spec, eval_spec = BatchSpec("train", example), BatchSpec("eval")  # batches the steps compile for

    train_step = functools.partial(experiment.train_step, config)
    placement = parallel.setup(
        config.parallel, init_fn=functools.partial(experiment.init, config),
        train_step=_discard_nonfinite(train_step) if config.train.skip_nonfinite_steps else train_step,
        eval_step=functools.partial(experiment.eval_step, config) if has_eval else None,
        example_batch=example, global_batch_size=dc.batch_size, devices=devices)

    stopping = selection.EarlyStopping.from_config(config.train.early_stopping)
    ckpt = ckpt_lib.Checkpointer(workdir, config.checkpoint)
    best_ckpt = ckpt_lib.Checkpointer(workdir, config.checkpoint, name="best", max_to_keep=1) \
        if stopping.enabled else None
    if config.checkpoint.restore_step is None:
        restored = ckpt.restore_latest(placement.abstract_state, iterator, config)
    else:
        restored = ckpt.restore_step(config.checkpoint.restore_step, placement.abstract_state, iterator, config)
    window: list[dict] = []  # host metrics since the last log line
    skipped: list[int] = []  # steps discarded as non-finite (train.skip_nonfinite_steps)
    if restored is None:
        state = placement.init(init_key, example)
        if config.get("init_from"):  # weights of another run (jaxml.transfer), loaded into the placed state
            source = experiment.init_source(config) if hasattr(experiment, "init_source") else None
            state = placement.place_state(transfer.load_state(config, placement.plain_state(state), source))
        start = 0
    else:
        state, start, train_key = placement.place_state(restored.state), restored.step, restored.rng
        stopping.load(restored.meta.get("early_stopping"))
        # The killed run's log window and skips continue, so its log rows match an uninterrupted run's.
        window.extend(restored.meta.get("log_window", []))
        skipped.extend(restored.meta.get("nonfinite_skipped", []))
        log.info(f"restored checkpoint at step {start} from {ckpt.directory}")
    if jax.process_index() == 0:  # rows logged after the restored save are logged again
        workdir_lib.rewind_metrics(workdir, restored.meta.get("metrics_size") if restored else 0, start)

    writer = log.MetricWriter(workdir, tensorboard=config.log.tensorboard)
    total = config.train.steps
    progress = log.Progress(total, first_step=start) if config.log.progress else None
    last_train: dict = {}
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
        if bad and len(skipped) < config.train.skip_nonfinite_steps:
            skipped.append(step)
            log.info(f"warning: non-finite training metrics at step {step}: {bad}; the step's update was "
                     f"discarded ({len(skipped)} of at most {config.train.skip_nonfinite_steps} "
                     f"(train.skip_nonfinite_steps) skipped: steps {skipped})")
            return
        if bad:
            raise NonFiniteError(
                f"non-finite training metrics at step {step}: {bad}. The run stopped"
                + (f" after skipping {len(skipped)} bad steps {skipped}" if skipped else "")
                + f"; the last good checkpoint (step {ckpt.latest_step()}) in {ckpt.directory} is left untouched.")
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

    summarize = functools.partial(experiment.eval_metrics, config) \
        if getattr(experiment, "eval_metrics", None) is not None else None

    def run_eval(step, source, prefix):
        metrics, sums = evaluate(placement, state, source, dc.eval_batch_size, prefix, summarize, eval_spec)
        writer.write(step, metrics)
        log.info(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics, sums

    def save(step, manager):
        manager.save(step, placement.plain_state(state), batches.get_state(), train_key, config,
                     meta={"early_stopping": stopping.state(), "log_window": list(window),
                           "nonfinite_skipped": list(skipped), "metrics_size": workdir_lib.metrics_size(workdir)})

    # Placed a step ahead; after the restore.
    batches = data_lib.DeviceBatches(iterator, lambda local: placement.place_batch(train_spec.check(local)))
    try:
        with _Preemption() as preemption:
            for step in range(start, total if not stopping.stopped else start):
                batch = next(batches)
                t_call = time.perf_counter()
                state, metrics = placement.train_step(state, batch, train_key)
                if step == start:  # the first call traces and compiles, or loads from the compilation cache
                    log.info(f"train step compiled in {time.perf_counter() - t_call:.2f} s "
                             f"(compilation cache: {_cache_dir() or 'off'})")
                drain()  # the previous step's metrics: ready by now, as this step was dispatched
                pending = (step + 1, metrics)
                done = step + 1
                if has_eval and config.train.eval_every and done % config.train.eval_every == 0 and done != total:
                    drain()
                    metrics_now, _ = run_eval(done, periodic_source, periodic_prefix)
                    if stopping.enabled and stopping.update(done, metrics_now):
                        save(done, best_ckpt)
                    stopping.stopped = stopping.enabled and stopping.should_stop
                stop = preemption.requested or ckpt.reached_preemption(done)
                # Saved after the eval, so the checkpoint holds the early-stopping state of this step.
                if (done % config.checkpoint.every_steps == 0 or done == total or stop or stopping.stopped
                        or ckpt.due_by_time()):
                    drain()  # never save a state whose step produced NaN
                    save(done, ckpt)
                if stop:
                    log.info(f"preemption requested: saved checkpoint at step {done}; exiting")
                    preempted = True
                    break
                if stopping.stopped:
                    log.info(f"early stopping at step {done}: {stopping.metric} has not improved by more than "
                             f"{stopping.min_delta} for {stopping.patience} evals")
                    break
            drain()
        if stopping.enabled and stopping.best_step is not None and not preempted:
            best = best_ckpt.restore_latest(placement.abstract_state)
            state = placement.place_state(best.state)
            log.info(f"restored the best checkpoint: step {best.step}, {stopping.metric} {stopping.best:.4f}")
        plain = placement.plain_state(state)
        final_step = int(jax.device_get(plain.step))
        eval_metrics, eval_sums = {}, None
        if has_eval and not preempted:
            if val_source is not None:
                eval_metrics, _ = run_eval(final_step, val_source, "val")
            test_metrics, eval_sums = run_eval(final_step, test_source, "eval")
            eval_metrics = {**eval_metrics, **test_metrics}
        if not preempted and jax.process_index() == 0:
            plots.learning_curves(os.path.join(workdir, "learning_curves.png"), log.read_metrics(workdir))
            if experiment.report is not None:
                experiment.report(config, plain, workdir, eval_sums)
    finally:
        if progress is not None:
            progress.close()
        for manager in (ckpt, best_ckpt):
            if manager is not None:
                manager.close()
        writer.close()
    return Result(state=plain, step=final_step, train_metrics=last_train, eval_metrics=eval_metrics,
                  eval_sums=eval_sums, preempted=preempted)


def _discard_nonfinite(train_step):
    """A step whose metrics or new state hold NaN/Inf keeps the state it got (its step still
    counts: the batch is consumed) and returns NaN metrics, which the loop reports."""
    def step(state, batch, rng):
        new, metrics = train_step(state, batch, rng)
        leaves = [x for x in jax.tree.leaves(new) if jnp.issubdtype(x.dtype, jnp.inexact)]
        state_ok = jnp.all(jnp.asarray([jnp.isfinite(x).all() for x in leaves]))
        ok = state_ok & jnp.all(jnp.asarray([jnp.isfinite(m).all() for m in jax.tree.leaves(metrics)]))
        if parallel.pmap_axis_name() is not None:  # every replica keeps or discards alike
            ok = jax.lax.pmin(ok.astype(jnp.int32), parallel.pmap_axis_name()).astype(bool)
        kept = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state).replace(step=new.step)
        return kept, jax.tree.map(
            lambda m: jnp.where(state_ok, m, jnp.nan) if jnp.issubdtype(jnp.result_type(m), jnp.inexact) else m,
            metrics)
    return step


def _cache_dir() -> str | None:
    return jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache else None


EXPERIMENT_FUNCTIONS = ("get_config", "init", "train_step", "eval_step", "report")


def _check_experiment(experiment) -> None:
    missing = [n for n in EXPERIMENT_FUNCTIONS if n not in vars(experiment)]
    if missing:
        raise TypeError(f"experiment {experiment.__name__} lacks {missing}: an experiment module defines "
                        f"{list(EXPERIMENT_FUNCTIONS)} (eval_step and report may be None)")
