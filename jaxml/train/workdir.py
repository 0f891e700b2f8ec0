"""The run directory: checked writable at start, locked so two runs never share it, and its
metrics.jsonl rewound to a restored checkpoint."""

import json
import os
import socket
import time

import jax

from jaxml.train import log


def check_writable(workdir: str) -> None:
    """Fail at start, not after an hour of training, when the workdir cannot be written."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"workdir {workdir} is not writable: {e}") from e


def metrics_size(workdir: str) -> int:
    """The length of metrics.jsonl now (rows are written whole: line-buffered, one write each)."""
    path = os.path.join(workdir, "metrics.jsonl")
    return os.path.getsize(path) if os.path.exists(path) else 0


def rewind_metrics(workdir: str, size: int | None, step: int) -> None:
    """Cut metrics.jsonl back to what it held when the checkpoint being restored was saved.

    A killed run logs beyond its last checkpoint (steps, evals, the final eval of a finished
    run); the resumed run logs them again, so without this they would appear twice.
    `size` is the file length stored in the checkpoint; checkpoints without it drop the rows
    past `step` instead. The file is replaced atomically.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        data = f.read()
    # A size that does not end a row, or keeps rows logged after `step`, belongs to another
    # metrics.jsonl (the checkpoint came from another workdir through a shared
    # checkpoint.directory): go by steps instead.
    if size is not None and size <= len(data) and all(
            (_row_step(line) or 0) <= step for line in data[:size].decode().splitlines(keepends=True)) \
            and data[size - 1:size] in (b"\n", b""):
        kept = data[:size]
    else:
        lines = data.decode().splitlines(keepends=True)
        kept = "".join(line for line in lines if _row_step(line) is not None and _row_step(line) <= step).encode()
    if kept != data:
        if not kept:  # a fresh start (no checkpoint, or every one was bad): the old rows are kept aside
            aside = f"{path}.{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.old"
            os.replace(path, aside)
            log.info(f"metrics.jsonl of the earlier attempt moved to {aside} (this run starts from step 0)")
            return
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(kept)
        os.replace(tmp, path)


def _row_step(line: str) -> int | None:
    try:
        return int(json.loads(line).get("step", 0)) if line.endswith("\n") else None
    except ValueError:  # a line cut short by a kill mid-write: not a row
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


class Lock:
    """`<workdir>/.lock` holding the owner's host and pid (process 0 of a run takes it).

    A second run on the same workdir refuses to start, naming the first; a lock left by a
    process that no longer exists on this host (a killed run) is taken over.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, ".lock")
        self.held = False

    def __enter__(self) -> "Lock":
        if jax.process_index() != 0:
            return self
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        while not self.held:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and (owner.get("host") != me["host"] or _alive(int(owner.get("pid", -1)))):
                    raise RuntimeError(
                        f"workdir {os.path.dirname(self.path)} is in use by process {owner.get('pid')} on "
                        f"{owner.get('host')} (lock file {self.path}). Wait for it to finish, or use another "
                        f"--workdir; if that process is gone (another machine), delete the lock file.") from None
                os.remove(self.path)  # stale: its process is dead (or the file is unreadable)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
        return self

    def _owner(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc) -> None:
        if self.held:
            os.remove(self.path)
            self.held = False
