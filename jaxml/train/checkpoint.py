"""Orbax checkpoints of a run: train state, data iterator position, RNG and config.

One step directory holds four items: `state` (the plain train state, any sharding),
`data` (grain's iterator state, one JSON file per process), `meta` (step, RNG key data and
what the loop keeps between steps) and `config` (the run's config as JSON). Nothing is
pickled: arrays are tensorstore (OCDBT) files, everything else JSON.

The checkpoints live in `checkpoint.directory` (default `<workdir>/checkpoints`), a local
path or a URL such as `gs://bucket/run`: every path here is an `etils.epath.Path`, the file
API Orbax uses itself, so the same code runs on a local disk and on cloud storage (gs://
needs gcsfs or TensorFlow installed for epath; the arrays go through tensorstore). The
workdir (log, lock, config.json) stays local to process 0.

Restoring goes newest first; a checkpoint that cannot be read (truncated array file,
missing metadata) is reported with its path and the reason, moved to the sibling directory
`<directory>_corrupt/` (kept, never deleted) and the next older one is tried. A readable
checkpoint of another model or config (its arrays' shapes or dtypes differ) is reported with
both shapes or dtypes and moved to `<directory>_incompatible/` the same way, so it is never
loaded in part nor buried under the new run's saves; with none left the run starts fresh.
Half-written temporary directories of a killed save are reported and removed. When the user
names a step (`checkpoint.restore_step`), any problem with it is an error: no fallback.
"""

import dataclasses
import json
import os
import time
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxml.train import log, optim

PyTree = Any


class IncompatibleCheckpointError(ValueError):
    """A readable checkpoint whose arrays do not match the model being trained."""


class ProcessCountError(IncompatibleCheckpointError):
    """A good checkpoint whose data position only the saving run's process count can resume:
    the run refuses to start (rerun with that count) rather than move the checkpoint aside."""


class CheckpointSaveError(OSError):
    """A save failed (a full disk, a lost mount); the checkpoints before it are intact."""


class CheckpointRestoreError(ValueError):
    """The checkpoint the user named (checkpoint.restore_step) is missing or unreadable."""


@dataclasses.dataclass
class Restored:
    state: PyTree
    step: int
    rng: jax.Array
    meta: dict  # what the loop stored beside the step and rng (early-stopping state, ...)


class _IteratorState:
    """An iterator state taken at a step boundary, in the form grain's checkpoint handler
    accepts for objects other than its own iterators (JSON bytes)."""

    def __init__(self, state: dict | None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state, indent=1).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state.decode())

    def start_prefetch(self) -> None:
        """Called by grain's handler after restore; there is nothing to prefetch."""


def _leaves_by_path(tree) -> dict:
    """Leaves keyed by 'a/b/0/c', so a state and Orbax's metadata of it (which turns
    dataclass attributes into dict keys) line up."""
    return dict(zip(jax.tree.leaves(optim.param_paths(tree)), jax.tree.leaves(tree)))


def checkpoint_directory(directory: str | None, workdir: str, name: str = "checkpoints") -> epath.Path:
    """Where checkpoints `name` live: `<workdir>/<name>` by default; with `checkpoint.directory`
    set, that directory for "checkpoints" and its sibling `<directory>_<name>` for others (best)."""
    if not directory:
        return epath.Path(os.path.abspath(workdir)) / name
    base = epath.Path(directory if "://" in directory else os.path.abspath(directory))
    return base if name == "checkpoints" else base.parent / f"{base.name}_{name}"


class Checkpointer:
    """Saves and restores a run's checkpoints in `checkpoint_directory(cfg.directory, workdir, name)`
    (`best` keeps the best one)."""

    def __init__(self, workdir: str, cfg: ml_collections.ConfigDict, name: str = "checkpoints",
                 max_to_keep: int | None = -1):
        self.directory = checkpoint_directory(cfg.get("directory"), workdir, name)
        self.failed = False
        self.save_retries = cfg.save_retries
        self.retry_wait_s = cfg.retry_wait_s
        self.every_s = 60.0 * cfg.every_minutes
        self._last_save = time.monotonic()
        max_to_keep = cfg.max_to_keep if max_to_keep == -1 else max_to_keep
        self._warn_half_written()
        self.manager = ocp.CheckpointManager(
            self.directory,
            # Handlers named up front so metadata can be read before the first restore.
            item_handlers=dict(state=ocp.StandardCheckpointHandler(), data=grain.checkpoint.CheckpointHandler(),
                               meta=ocp.JsonCheckpointHandler(), config=ocp.JsonCheckpointHandler()),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=cfg.async_save,
                # Half-written step directories of a killed run are removed at start.
                cleanup_tmp_directories=True,
                create=True,
            ),
        )

    def _warn_half_written(self) -> None:
        for path in half_written(self.directory):
            log.info(f"warning: skipping half-written checkpoint {path} (a save was interrupted); it will be removed")

    def due_by_time(self) -> bool:
        """True when checkpoint.every_minutes have passed since the last save (or the start).

        Multi-host: process 0's clock decides for all, so every host saves at the same step.
        """
        if self.every_s <= 0:
            return False
        due = time.monotonic() - self._last_save >= self.every_s
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            due = bool(multihost_utils.broadcast_one_to_all(np.int32(due)))
        return due

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: PyTree, data_state: dict, rng: jax.Array,
             config: ml_collections.ConfigDict, meta: dict | None = None) -> None:
        """Start saving `state` (plain, unreplicated) at `step`; returns before the write ends when async."""
        meta = {**(meta or {}), "step": int(step), "rng": np.asarray(jax.random.key_data(rng)).tolist()}
        previous = self.manager.latest_step()
        self._last_save = time.monotonic()
        for attempt in range(self.save_retries + 1):
            try:
                self.manager.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=grain.checkpoint.CheckpointSave(_IteratorState(data_state)),
                    meta=ocp.args.JsonSave(meta),
                    config=ocp.args.JsonSave(config.to_dict()),
                ), force=True)
                return
            except Exception as e:  # noqa: BLE001 -- retried, or raised again with what the user needs to know
                if attempt == self.save_retries:
                    self._fail(step, previous, e)
                wait = self.retry_wait_s * 2**attempt
                log.info(f"warning: saving the checkpoint of step {step} in {self.directory} failed "
                         f"({type(e).__name__}: {e}); retry {attempt + 1} of {self.save_retries} in {wait:g} s")
                time.sleep(wait)
                self._remove_tmp(step)

    def _fail(self, step: int | None, previous: int | None, error: Exception):
        self.failed = True
        if step is not None:
            self._remove_tmp(step)
        # Orbax writes into a temporary directory and renames it only when complete, so a
        # failed save leaves every earlier checkpoint as it was.
        raise CheckpointSaveError(
            f"saving the checkpoint{'' if step is None else f' of step {step}'} in {self.directory} failed "
            f"({type(error).__name__}: {error}). "
            + ("Earlier checkpoints are intact" if previous is None else f"The previous checkpoint (step {previous}) is intact")
            + "; free space (or fix the path) and run the same command again to resume.") from error

    def _remove_tmp(self, step: int) -> None:
        """Remove the temporary directory a failed save of `step` left (a retry starts clean)."""
        # Orbax writes the new directory's step metadata on a thread of its own: let it finish
        # first, or it lands in a directory being removed (which then stays, half-removed) or in
        # a removed one (and its error fails the retry). The manager's own wait_until_finished
        # returns at once when no save got as far as its finalize thread, so the checkpointer's
        # is called (tests/test_reliability.py fails if Orbax renames it). An error it raises
        # belongs to the save that failed, which is being reported or retried already.
        # (A synchronous checkpointer writes it before returning and has no such method.)
        wait = getattr(getattr(self.manager, "_checkpointer", None), "wait_until_finished", None)
        try:
            if wait is not None:
                wait()
        except Exception:  # noqa: BLE001
            pass
        if jax.process_index() != 0:
            return
        for path in half_written(self.directory, step):
            try:
                path.rmtree()
            except OSError:  # already gone, or the disk is what failed: the next save reports it
                pass
        self.manager.reload()

    def restore_latest(self, abstract_state: PyTree, iterator=None, config=None) -> Restored | None:
        """Restore the newest readable checkpoint into `abstract_state`'s shapes and shardings.

        Sets `iterator`'s position (when given) from the checkpoint; warns about keys where
        `config` (when given) differs from the checkpoint's. None when there is none.
        """
        skipped = False
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self._restore(step, abstract_state, iterator, config)
            except ProcessCountError:
                raise
            except IncompatibleCheckpointError as e:  # another model's: kept aside, not loaded in part
                self._quarantine(step, "incompatible", f"warning: skipping {e}")
            except Exception as e:  # noqa: BLE001 -- any read failure means this step is unusable
                self._quarantine(step, "corrupt", f"warning: skipping unreadable checkpoint {self._path(step)} "
                                                  f"({_reason(e)})")
            skipped = True
        if skipped:
            log.info(f"warning: no usable checkpoint left in {self.directory}; the run starts from step 0")
        return None

    def restore_step(self, step: int, abstract_state: PyTree, iterator=None, config=None) -> Restored:
        """Restore exactly checkpoint `step`, the user's choice: a missing or unreadable one is an error."""
        path = self._path(step)
        if step not in self.manager.all_steps():
            raise CheckpointRestoreError(
                f"checkpoint.restore_step={step}: there is no checkpoint {path}; available steps: "
                f"{sorted(self.manager.all_steps()) or 'none'}")
        try:
            restored = self._restore(step, abstract_state, iterator, config)
        except IncompatibleCheckpointError as e:
            raise IncompatibleCheckpointError(
                f"checkpoint.restore_step={step}: {e}The run does not start. Name another step, unset "
                "checkpoint.restore_step to take the newest usable one, or use a new --workdir for a new model."
            ) from e
        except Exception as e:  # noqa: BLE001 -- refuse to start, saying why
            raise CheckpointRestoreError(
                f"checkpoint.restore_step={step}: checkpoint {path} cannot be read ({_reason(e)}); the run "
                "does not start. Name another step, or unset checkpoint.restore_step to take the newest good one."
            ) from e
        # The run continues from `step`: newer checkpoints would collide with its saves and be
        # taken for its progress at the next start, so they are moved aside (never deleted).
        newer = [s for s in self.manager.all_steps() if s > step]
        if newer and jax.process_index() == 0:
            aside = aside_directory(self.directory, "superseded") / str(int(time.time()))
            for s in newer:
                move(self._path(s), aside / str(s))
            log.info(f"restored the named step {step}: newer checkpoints {sorted(newer)} moved to {aside}. "
                     "Unset checkpoint.restore_step for later restarts, or each one returns to this step.")
        self.manager.reload()
        return restored

    def _path(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def _restore(self, step: int, abstract_state: PyTree, iterator, config) -> Restored:
        path = self._path(step)
        self._check_compatible(step, abstract_state, path)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            meta=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        ))
        data_state = _read_data_state(path / "data")
        if config is not None:
            _warn_config_changes(path, out["config"], config)
        if iterator is not None:
            iterator.set_state(data_state)
        meta = dict(out["meta"])
        rng = jax.random.wrap_key_data(np.asarray(meta.pop("rng"), dtype=np.uint32))
        return Restored(state=out["state"], step=int(meta.pop("step")), rng=rng, meta=meta)

    def _check_compatible(self, step: int, abstract_state: PyTree, path: str) -> None:
        stored = self.manager.item_metadata(step)["state"]
        if stored is None:
            raise FileNotFoundError(f"no readable state metadata in {path}")
        want = _leaves_by_path(abstract_state)
        have = _leaves_by_path(stored)
        params_first = lambda k: (not k.startswith("params/"), k)  # what the user recognises leads the list
        missing = sorted(set(want) - set(have), key=params_first)
        unused = sorted(set(have) - set(want), key=params_first)
        both = sorted(set(want) & set(have), key=params_first)
        wrong = [f"{k}: checkpoint {tuple(have[k].shape)}, model {tuple(want[k].shape)}"
                 for k in both if tuple(have[k].shape) != tuple(want[k].shape)]
        # Restoring would cast silently: float32 moments into bfloat16 lose what they hold.
        cast = [f"{k}: checkpoint {np.dtype(have[k].dtype)}, model {np.dtype(want[k].dtype)}"
                for k in both if np.dtype(have[k].dtype) != np.dtype(want[k].dtype)]
        if missing or unused or wrong or cast:
            raise IncompatibleCheckpointError(
                f"checkpoint {path}, which does not match this model (another model or config):\n"
                + (f"  missing in checkpoint: {missing[:8]}\n" if missing else "")
                + (f"  not in model: {unused[:8]}\n" if unused else "")
                + ("  shape mismatch: " + "; ".join(wrong[:8]) + "\n" if wrong else "")
                + ("  dtype mismatch: " + "; ".join(cast[:8]) + "\n" if cast else ""))

    def _quarantine(self, step: int, why: str, report: str) -> None:
        """Move checkpoint `step` to `<directory>_<why>/` (kept, never deleted) and log `report`."""
        dest = aside_directory(self.directory, why) / f"{step}-{int(time.time())}"
        if jax.process_index() == 0:
            move(self._path(step), dest)
        log.info(f"{report.rstrip()}\n  moved to {dest}")
        self.manager.reload()

    def reached_preemption(self, step: int) -> bool:
        """True when the multi-host preemption sync point says to save now."""
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        """Wait for pending async saves (raising CheckpointSaveError if one failed), then close."""
        try:
            if not self.failed:
                try:
                    self.manager.wait_until_finished()
                except Exception as e:  # noqa: BLE001 -- an async write failed in the background
                    self._fail(None, None, e)
        finally:
            self.manager.close()


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def aside_directory(directory: epath.Path, why: str) -> epath.Path:
    """`<directory>_<why>`: where checkpoints that must not be used are kept (never deleted)."""
    return directory.parent / f"{directory.name}_{why}"


def move(path: epath.Path, dest: epath.Path) -> None:
    """Move a step directory (on cloud storage: every object under its prefix)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    path.rename(dest)


def half_written(directory: epath.Path, step: int | None = None) -> list[epath.Path]:
    """Orbax's temporary directories in `directory` (of `step`, or all): saves that never finished."""
    if not directory.is_dir():
        return []
    prefix = "" if step is None else f"{step}."
    return sorted(p for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name and p.name.startswith(prefix))


def _read_data_state(directory: epath.Path) -> dict:
    """This process's data position (grain writes `process_<i>-of-<n>.json`, plain JSON).

    With another process count than at save time, the position is taken over when every
    saved process held the same one: the batch number of the global stream, which is
    what jaxml's pipeline stores for num_workers=0 (each process derives its share of
    global batch b from b). Per-worker states (num_workers > 0) cannot be remapped.
    """
    directory = epath.Path(directory)
    index, count = jax.process_index(), jax.process_count()
    own = directory / f"process_{index}-of-{count}.json"
    if own.exists():
        return json.loads(own.read_text())
    names = sorted(p.name for p in directory.iterdir() if p.name.startswith("process_") and p.name.endswith(".json")) \
        if directory.is_dir() else []
    if not names:
        raise FileNotFoundError(f"no data position (process_*.json) in {directory}")
    states = [json.loads((directory / name).read_text()) for name in names]
    if any(s != states[0] for s in states):  # good, but not for this process count: refuse rather than skip it
        raise ProcessCountError(
            f"the data position in {directory} was saved by {len(names)} processes with different states "
            f"({names}); it cannot be mapped onto {count} process(es). Resume with the process count "
            "(and data.num_workers) of the saving run.")
    log.info(f"data position of {directory} saved by {len(names)} process(es), restored on {count}: "
             f"the global batch number ({states[0]}) carries over")
    return states[0]


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _warn_config_changes(path: str, stored: dict, config: ml_collections.ConfigDict) -> None:
    """Name every key whose value differs from the checkpoint's config (a resume with new values)."""
    now = _flatten(json.loads(json.dumps(config.to_dict(), default=str)))
    then = _flatten(json.loads(json.dumps(stored, default=str)))
    changed = [f"{k}: {then.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}"
               for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)]
    if changed:
        log.info(f"warning: checkpoint {path} was saved with another config; resuming with the new values: "
                 + "; ".join(changed[:12]) + (f" (+{len(changed) - 12} more)" if len(changed) > 12 else ""))
