"""`checkpoint.directory`: checkpoints outside the workdir (a shared path or a gs:// URL on a
multi-host slice) while the workdir keeps the log, lock and config.

Orbax writes a local directory here exactly as it writes gs:// (epath for its files,
tensorstore for the arrays). gs:// itself cannot be reached offline; jaxml's own file
handling of checkpoints (data positions, half-written saves, moving bad ones aside) goes
through `etils.epath` and is run below on an object store kept in memory (fsspec's memory
filesystem behind epath's gs:// backend), where, as on GCS, directories are only prefixes.
"""

import json
import os

import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.memory import MemoryFileSystem

from experiments import cnn
from jaxml.train import checkpoint as ckpt_lib
from jaxml.train import loop
from jaxml.train import workdir as workdir_lib
from tests.test_engine import assert_trees_close, params_of, tiny_config


def _steps(directory) -> list[int]:
    return sorted(int(s) for s in os.listdir(directory) if s.isdigit())


def test_checkpoints_outside_the_workdir_train_resume_and_quarantine(tmp_path, capsys):
    shared = tmp_path / "shared" / "run1"  # what a bucket or an NFS mount is on a slice
    config = tiny_config(**{"train.steps": 8, "checkpoint.directory": str(shared)})
    full = loop.train(cnn, config, str(tmp_path / "work"))
    assert _steps(shared) == [4, 8]
    assert not (tmp_path / "work" / "checkpoints").exists()
    assert {"config.json", "metrics.jsonl"} <= set(os.listdir(tmp_path / "work"))

    # Another workdir (another host's local disk) finds the run through the directory; a bad
    # checkpoint there is moved to the directory's sibling `<name>_corrupt` and the older one used.
    os.remove(shared / "8" / "state" / "_METADATA")
    resumed = loop.train(cnn, config, str(tmp_path / "work2"))
    out = capsys.readouterr().out
    assert f"skipping unreadable checkpoint {shared / '8'} (" in out
    assert "restored checkpoint at step 4 from " + str(shared) in out
    assert [n.split("-")[0] for n in os.listdir(tmp_path / "shared" / "run1_corrupt")] == ["8"]
    assert _steps(shared) == [4, 8]  # step 8 saved again by the resumed run
    assert_trees_close(params_of(full), params_of(resumed), rtol=0, atol=0)


def test_metrics_rewind_ignores_a_size_from_another_workdirs_log(tmp_path):
    # This workdir logged steps 6 and 8; the checkpoint of step 4 (saved elsewhere) recorded
    # the length of *its* log, which here ends inside no row of step <= 4: rewind by step.
    rows = [json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in (2, 6, 8)]
    (tmp_path / "metrics.jsonl").write_text("".join(rows))
    workdir_lib.rewind_metrics(str(tmp_path), len(rows[0]) + len(rows[1]), 4)
    assert (tmp_path / "metrics.jsonl").read_text() == rows[0]
    # The run's own log: the recorded size is taken as it is.
    (tmp_path / "metrics.jsonl").write_text("".join(rows))
    workdir_lib.rewind_metrics(str(tmp_path), len(rows[0]) + len(rows[1]), 6)
    assert (tmp_path / "metrics.jsonl").read_text() == rows[0] + rows[1]


def test_directory_names():
    work = "/w/run"
    assert str(ckpt_lib.checkpoint_directory(None, work)) == "/w/run/checkpoints"
    assert str(ckpt_lib.checkpoint_directory(None, work, "best")) == "/w/run/best"
    assert str(ckpt_lib.checkpoint_directory("gs://bucket/runs/a", work)) == "gs://bucket/runs/a"
    assert str(ckpt_lib.checkpoint_directory("gs://bucket/runs/a", work, "best")) == "gs://bucket/runs/a_best"
    assert str(ckpt_lib.checkpoint_directory("rel/ckpt", work)) == os.path.abspath("rel/ckpt")


@pytest.fixture
def object_store(monkeypatch):
    """gs:// served by a fresh fsspec in-memory filesystem for the duration of a test."""
    if gpath._is_tf_installed():
        pytest.skip("TensorFlow is installed: epath sends gs:// to tf.io.gfile, not fsspec")
    store = MemoryFileSystem(skip_instance_cache=True)
    store.store, store.pseudo_dirs = {}, [""]  # not the class-wide store other code may use
    monkeypatch.setattr(type(epath_backend.fsspec_backend), "fs", lambda self, path: store)
    return epath.Path("gs://bucket/run/checkpoints")


def test_checkpoint_file_handling_on_an_object_store(object_store):
    ckpts = object_store
    data = ckpts / "8" / "data"
    data.mkdir(parents=True)
    (data / "process_0-of-2.json").write_text(json.dumps({"next_index": 8}))
    (data / "process_1-of-2.json").write_text(json.dumps({"next_index": 8}))
    (ckpts / "12.orbax-checkpoint-tmp-77" / "state").mkdir(parents=True)
    (ckpts / "12.orbax-checkpoint-tmp-77" / "state" / "x").write_text("partial")

    # A 2-process run's data position read back on 1 process, from gs://.
    assert ckpt_lib._read_data_state(data) == {"next_index": 8}
    (data / "process_1-of-2.json").write_text(json.dumps({"next_index": 9}))
    with pytest.raises(ckpt_lib.ProcessCountError, match=r"data position in gs://bucket/run/checkpoints/8/data"):
        ckpt_lib._read_data_state(data)
    with pytest.raises(FileNotFoundError, match=r"no data position .* in gs://bucket/run/checkpoints/4/data"):
        ckpt_lib._read_data_state(ckpts / "4" / "data")

    assert ckpt_lib.half_written(ckpts) == [ckpts / "12.orbax-checkpoint-tmp-77"]
    assert ckpt_lib.half_written(ckpts, 8) == []
    ckpt_lib.half_written(ckpts, 12)[0].rmtree()
    assert ckpt_lib.half_written(ckpts) == []

    # Moved aside as the Checkpointer does with a bad one: a prefix rename on the store.
    aside = ckpt_lib.aside_directory(ckpts, "corrupt") / "8-1"
    ckpt_lib.move(ckpts / "8", aside)
    assert str(aside) == "gs://bucket/run/checkpoints_corrupt/8-1"
    assert not (ckpts / "8").exists() and (aside / "data" / "process_0-of-2.json").exists()
