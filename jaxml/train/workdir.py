"""The run directory: checked writable at start, and locked so two runs never share it."""

import json
import os
import socket

import jax


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


def drop_metrics_after(workdir: str, step: int) -> None:
    """Remove rows past `step` from metrics.jsonl: a run restored at `step` logs them again.

    A killed run logs steps beyond its last checkpoint; without this, a resumed run's
    metrics.jsonl would hold those steps twice. The file is replaced atomically.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a kill mid-write: not a row
            continue
        if row.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept != lines:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


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
