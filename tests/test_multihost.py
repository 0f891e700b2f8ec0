"""Multi-host for real: two local processes joined by `jax.distributed.initialize` (CPU
collectives over gloo, JAX's default for CPU in 0.10 / 0.12), 4 fake devices each, train the
tiny CNN (dropout, random crops and flips on) through the CLI, resume from their checkpoint,
and match one process with 8 devices. Plus, in process: the per-process input shards are
the rows of the global batch each process's devices hold.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import cnn
from jaxml import data
from jaxml.train import checkpoint as ckpt_lib
from jaxml.train import log, loop, parallel
from tests.test_engine import REPO, assert_trees_close, params_of, tiny_config

# Per-example randomness (dropout masks, crop offsets, flips) is drawn by row of the global
# batch, and each process reads the rows its devices hold (jaxml.data.pipeline): the global
# batch is row for row the one-process batch, so the random numbers are the same too and the
# runs differ only by float summation order across processes (hence the tolerance).
# A constant learning rate lets the first run stop at step 6 and the resumed run go on to 12
# with the schedule of an uninterrupted 12-step run.
OVERRIDES = {"model.dropout": 0.3, "data.augment.crop_padding": 1, "data.augment.flip": True,
             "optim.schedule": "constant", "optim.warmup_steps": 0, "train.eval_every": 0}


def _ids(n):
    return data.ArraySource({"id": np.arange(n)})


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_blocks_placed_together_are_the_one_process_batch(process_count):
    source, global_batch = _ids(37), 8
    one = iter(data.train_dataset(source, global_batch_size=global_batch, seed=3))
    shards = [iter(data.train_dataset(source, global_batch_size=global_batch, seed=3, process_index=p,
                                      process_count=process_count)) for p in range(process_count)]
    for b in range(12):  # several epochs
        together = np.concatenate([next(s)["id"] for s in shards])  # process p's block is rows p*G/P...
        np.testing.assert_array_equal(together, next(one)["id"], err_msg=f"batch {b}")
    evals = [list(data.eval_batches(source, global_batch_size=global_batch, process_index=p,
                                    process_count=process_count)) for p in range(process_count)]
    for b, reference in enumerate(data.eval_batches(source, global_batch_size=global_batch)):
        for key in ("id", "mask"):
            np.testing.assert_array_equal(np.concatenate([e[b][key] for e in evals]), reference[key])


def test_process_rows_follow_the_mesh():
    mesh = parallel.make_mesh(tiny_config().parallel)
    np.testing.assert_array_equal(parallel.process_rows(mesh, 32, "jit"), np.arange(32))
    # A mesh that replicates the batch (all devices on `tensor`): every process feeds all rows.
    replicated = parallel.make_mesh(tiny_config(**{"parallel.mesh.data": 1, "parallel.mesh.tensor": -1}).parallel)
    np.testing.assert_array_equal(parallel.process_rows(replicated, 6, "jit"), np.arange(6))
    with pytest.raises(ValueError, match=r"data.eval_batch_size=12 .* divisible by the data-parallel size 8"):
        parallel.process_rows(mesh, 12, "jit", key="data.eval_batch_size")
    rows = [3, 4, 5]
    batch = next(iter(data.train_dataset(_ids(10), global_batch_size=6, seed=0, rows=rows)))
    full = next(iter(data.train_dataset(_ids(10), global_batch_size=6, seed=0)))
    np.testing.assert_array_equal(batch["id"], full["id"][rows])
    with pytest.raises(ValueError, match=r"rows must be increasing positions in \[0, 6\)"):
        data.train_dataset(_ids(10), global_batch_size=6, seed=0, rows=[4, 3])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(workdir, steps: int, timeout: float = 300) -> list[str]:
    """Run the CLI as process 0 and 1 of a 2-process job; both outputs (each must succeed)."""
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    args = [f"--config.{k}={v}" for k, v in OVERRIDES.items()] + [f"--config.train.steps={steps}"]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "experiments.cnn", "--config=experiments/cnn.py:tiny", f"--workdir={workdir}",
         f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
    return outs


@pytest.mark.slow  # four CLI processes start JAX and compile (about a minute on 2 shared cores)
def test_two_processes_train_resume_and_match_one_process(tmp_path):
    # The single-process reference first: it also prepares the digits into TFDS_DATA_DIR,
    # which the two processes then only read.
    config = tiny_config(**OVERRIDES)
    single = loop.train(cnn, config, str(tmp_path / "single"))

    multi = tmp_path / "multi"
    first = _two_processes(multi, steps=6)
    assert "process 0 of 2, 4 local / 8 global devices" in first[0], first[0][-2000:]
    assert "process 1 of 2, 4 local / 8 global devices" in first[1], first[1][-2000:]
    second = _two_processes(multi, steps=12)
    assert "restored checkpoint at step 6" in second[0], second[0][-2000:]
    # Only process 0 prints and logs; every step's metrics row is written once.
    assert "done: step 12" in second[0] and "done:" not in second[1], second[1][-2000:]
    rows = log.read_metrics(str(multi))
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == sorted(set(train_steps)) == list(range(2, 13, 2)), train_steps
    assert json.loads((multi / "config.json").read_text())["train"]["steps"] == 12

    # The checkpoint both processes wrote through Orbax (each its own shards) restores whole.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
                            single.state)
    restored = ckpt_lib.Checkpointer(str(multi), config.checkpoint).restore_latest(abstract)
    assert restored.step == 12
    assert_trees_close(jax.tree.map(np.asarray, restored.state.params), params_of(single), rtol=2e-4, atol=2e-5)

    reference = log.read_metrics(str(tmp_path / "single"))
    got = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    want = [(r["step"], r["train/loss"]) for r in reference if "train/loss" in r]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # The first run also evaluated at its end (step 6); the final evals are at step 12.
    final = [r for r in rows if "eval/loss" in r][-1]
    want = [r for r in reference if "eval/loss" in r][-1]
    assert final["step"] == want["step"] == 12
    for key in ("eval/loss", "eval/accuracy"):
        np.testing.assert_allclose(final[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key)
