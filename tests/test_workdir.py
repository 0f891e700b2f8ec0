"""The workdir: writable at start, one run at a time, stale locks taken over."""

import json
import os
import subprocess
import sys

import pytest

from jaxml.train import workdir


def test_unwritable_workdir_fails_at_start(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="workdir .*a-file/run is not writable"):
        workdir.check_writable(str(blocker / "run"))


def test_second_run_is_refused_naming_the_first(tmp_path):
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": first.pid}))
        with pytest.raises(RuntimeError, match=f"in use by process {first.pid}"):
            with workdir.Lock(str(tmp_path)):
                pass
        assert (tmp_path / ".lock").exists()  # the live owner's lock is left alone
    finally:
        first.kill()
        first.wait()


def test_stale_lock_of_a_dead_process_is_taken_over_and_released(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid}))
    with workdir.Lock(str(tmp_path)):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()


def test_a_fresh_start_keeps_the_earlier_attempts_metrics_aside(tmp_path):
    """No usable checkpoint (none written, or all moved aside as bad): the run starts at step 0 with
    an empty metrics.jsonl, and the earlier attempt's rows are moved aside, not deleted."""
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(rows))
    workdir.rewind_metrics(str(tmp_path), 0, 0)
    assert not (tmp_path / "metrics.jsonl").exists()
    [aside] = tmp_path.glob("metrics.jsonl.*.old")
    assert aside.read_text() == "".join(rows)
    workdir.rewind_metrics(str(tmp_path), 0, 0)  # nothing logged yet: nothing to move
    assert list(tmp_path.glob("metrics.jsonl.*.old")) == [aside]
