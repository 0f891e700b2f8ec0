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
