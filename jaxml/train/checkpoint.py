"""Orbax checkpoints of a run: train state, data iterator position, RNG and config.

One step directory holds four items: `state` (the plain train state, any sharding),
`data` (grain's iterator state, one file per process), `meta` (step and RNG key data) and
`config` (the run's config as JSON). Restoring goes newest first; a checkpoint that cannot
be read is reported, moved to `<workdir>/checkpoints_corrupt/` (kept, never deleted) and the
next older one is tried. A checkpoint whose arrays do not fit the current model is not
corrupt but foreign: the run refuses to start rather than load part of it.
"""

import dataclasses
import json
import os
import shutil
import time
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxml.train import log, optim

PyTree = Any


class IncompatibleCheckpointError(ValueError):
    """A readable checkpoint whose arrays do not match the model being trained."""


class CheckpointSaveError(OSError):
    """A save failed (a full disk, a lost mount); the checkpoints before it are intact."""


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


class Checkpointer:
    """Saves and restores a run's checkpoints under `workdir/<name>` (`best` keeps the best one)."""

    def __init__(self, workdir: str, cfg: ml_collections.ConfigDict, name: str = "checkpoints",
                 max_to_keep: int | None = -1):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, name)
        self.failed = False
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
        if not os.path.isdir(self.directory):
            return
        for name in sorted(os.listdir(self.directory)):
            if ".orbax-checkpoint-tmp" in name:
                log.info(f"warning: skipping half-written checkpoint {os.path.join(self.directory, name)} "
                         "(a save was interrupted); it will be removed")

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: PyTree, data_state: dict, rng: jax.Array,
             config: ml_collections.ConfigDict, meta: dict | None = None) -> None:
        """Start saving `state` (plain, unreplicated) at `step`; returns before the write ends when async."""
        meta = {**(meta or {}), "step": int(step), "rng": np.asarray(jax.random.key_data(rng)).tolist()}
        previous = self.manager.latest_step()
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(_IteratorState(data_state)),
                meta=ocp.args.JsonSave(meta),
                config=ocp.args.JsonSave(config.to_dict()),
            ), force=True)
        except Exception as e:  # noqa: BLE001 -- raised again with what the user needs to know
            self._fail(step, previous, e)

    def _fail(self, step: int | None, previous: int | None, error: Exception):
        self.failed = True
        # Orbax writes into a temporary directory and renames it only when complete, so a
        # failed save leaves every earlier checkpoint as it was.
        raise CheckpointSaveError(
            f"saving the checkpoint{'' if step is None else f' of step {step}'} in {self.directory} failed "
            f"({type(error).__name__}: {error}). "
            + ("Earlier checkpoints are intact" if previous is None else f"The previous checkpoint (step {previous}) is intact")
            + "; free space (or fix the path) and run the same command again to resume.") from error

    def restore_latest(self, abstract_state: PyTree, iterator=None) -> Restored | None:
        """Restore the newest readable checkpoint into `abstract_state`'s shapes and shardings.

        Sets `iterator`'s position (when given) from the checkpoint. None when there is none.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            path = os.path.join(self.directory, str(step))
            try:
                self._check_compatible(step, abstract_state, path)
                data = _IteratorState(None)
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=grain.checkpoint.CheckpointRestore(data),
                    meta=ocp.args.JsonRestore(),
                ))
            except IncompatibleCheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 -- any read failure means this step is unusable
                self._quarantine(step, path, e)
                continue
            if iterator is not None:
                iterator.set_state(data.state)
            meta = dict(out["meta"])
            rng = jax.random.wrap_key_data(np.asarray(meta.pop("rng"), dtype=np.uint32))
            return Restored(state=out["state"], step=int(meta.pop("step")), rng=rng, meta=meta)
        return None

    def _check_compatible(self, step: int, abstract_state: PyTree, path: str) -> None:
        stored = self.manager.item_metadata(step)["state"]
        if stored is None:
            raise FileNotFoundError(f"no readable state metadata in {path}")
        want = _leaves_by_path(abstract_state)
        have = _leaves_by_path(stored)
        missing, unused = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        wrong = [f"{k}: checkpoint {tuple(have[k].shape)}, model {tuple(want[k].shape)}"
                 for k in sorted(set(want) & set(have)) if tuple(have[k].shape) != tuple(want[k].shape)]
        if missing or unused or wrong:
            raise IncompatibleCheckpointError(
                f"checkpoint {path} does not match this model (a different model or config?).\n"
                + (f"  missing in checkpoint: {missing[:8]}\n" if missing else "")
                + (f"  not in model: {unused[:8]}\n" if unused else "")
                + ("  shape mismatch: " + "; ".join(wrong[:8]) + "\n" if wrong else "")
                + "Use a new --workdir, or remove that checkpoint if it is not wanted.")

    def _quarantine(self, step: int, path: str, error: Exception) -> None:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        dest = os.path.join(self.workdir, "checkpoints_corrupt", f"{step}-{int(time.time())}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.move(path, dest)
        log.info(f"warning: skipping unreadable checkpoint {path} ({reason}); moved to {dest}")
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
