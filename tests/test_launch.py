"""launch/: the TPU VM launcher's exact gcloud commands (--dry-run), setup.sh's plan, and the
environment detection behind the CLI's multi-host initialisation."""

import os
import shlex
import subprocess
import sys

import pytest

from jaxml import runtime
from tests.test_engine import REPO

TPU_VM = os.path.join(REPO, "launch", "tpu_vm.sh")
SETUP = os.path.join(REPO, "launch", "setup.sh")
GCLOUD = ["gcloud", "compute", "tpus", "tpu-vm"]


def _dry_run(*args) -> list[list[str]]:
    """The commands `tpu_vm.sh ... --dry-run` prints, each split the way a shell would."""
    out = subprocess.run(["bash", TPU_VM, *args, "--dry-run"] if "--" not in args else
                         ["bash", TPU_VM, *args[:args.index("--")], "--dry-run", *args[args.index("--"):]],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return [shlex.split(line) for line in out.stdout.splitlines()]


def _flags(argv) -> dict:
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


V5E = ["--project=my-proj", "--zone=us-west4-a", "--name=jx-v5e", "--accelerator-type=v5litepod-8"]
V4 = ["--project=my-proj", "--zone=us-central2-b", "--name=jx-v4", "--accelerator-type=v4-32"]


@pytest.mark.parametrize("where,runtime_version", [(V5E, "v2-alpha-tpuv5-lite"), (V4, "tpu-ubuntu2204-base")])
def test_create_command(where, runtime_version):
    [create] = _dry_run("create", *where, f"--runtime-version={runtime_version}")
    name = _flags(where)["name"]
    assert create[:6] == GCLOUD + ["create", name]
    assert _flags(create) == {"project": "my-proj", "zone": _flags(where)["zone"],
                              "accelerator-type": _flags(where)["accelerator-type"], "version": runtime_version}
    [spot] = _dry_run("create", *where, f"--runtime-version={runtime_version}", "--spot")
    assert spot == create + ["--spot"]


def test_setup_copies_the_checkout_to_every_worker_and_installs():
    tar, scp, ssh = _dry_run("setup", *V4)
    assert tar[:2] == ["tar", "-czf"] and tar[-1] == "." and "--exclude=.git" in tar
    tarball = tar[2]
    assert scp[:5] == GCLOUD + ["scp"] and scp[5:7] == [tarball, "jx-v4:~/jaxml.tar.gz"]
    assert "--worker=all" in scp
    assert ssh[:6] == GCLOUD + ["ssh", "jx-v4"] and "--worker=all" in ssh
    command = _flags(ssh)["command"]
    assert "tar -xzf ~/jaxml.tar.gz -C ~/jaxml" in command
    # TPU VM images run Ubuntu 22.04, whose Python (3.10) is too old: setup.sh apt-installs 3.11.
    assert "bash ~/jaxml/launch/setup.sh --accelerator=tpu --install-python" in command


def test_run_on_all_workers_multi_host_initialises_jax_distributed():
    # v4-32 is 16 chips on 4 hosts: every worker runs the same program, told to join the others.
    [ssh] = _dry_run("run", *V4, "--", "experiments.gpt", "--workdir=/mnt/shared/gpt run",
                     "--config.train.steps=2000")
    assert ssh[:6] == GCLOUD + ["ssh", "jx-v4"]
    assert _flags(ssh)["worker"] == "all" and _flags(ssh)["project"] == "my-proj"
    remote = shlex.split(_flags(ssh)["command"])  # what each worker's shell runs
    python = remote[remote.index("python"):remote.index("2>&1")]
    assert python == ["python", "-m", "experiments.gpt", "--workdir=/mnt/shared/gpt run",
                      "--config.train.steps=2000", "--distributed=true"]
    assert remote[-2:] == ["tee", "~/jaxml_run.log"]  # streamed back by ssh, and kept on the worker


def test_run_on_a_single_host_needs_no_distributed_init():
    [ssh] = _dry_run("run", *V5E, "--", "experiments.cnn")
    remote = shlex.split(_flags(ssh)["command"])
    assert remote[remote.index("python"):remote.index("2>&1")] == ["python", "-m", "experiments.cnn"]
    assert _flags(ssh)["worker"] == "all"


def test_stop_delete_logs():
    [stop] = _dry_run("stop", *V5E)
    assert stop == GCLOUD + ["stop", "jx-v5e", "--project=my-proj", "--zone=us-west4-a"]
    [delete] = _dry_run("delete", *V4)
    assert delete == GCLOUD + ["delete", "jx-v4", "--project=my-proj", "--zone=us-central2-b", "--quiet"]
    [logs] = _dry_run("logs", *V4)
    assert "--worker=all" in logs and "tail" in _flags(logs)["command"]


@pytest.mark.parametrize("args,message", [
    (["create", "--zone=z", "--name=n", "--runtime-version=v"], "--project=ID is required"),
    (["create", "--project=p", "--zone=z", "--name=n"], "--runtime-version is required"),
    (["create", "--project=p", "--zone=z", "--name=n", "--accelerator-type=tpu-8", "--runtime-version=v"],
     "expected e.g. v5litepod-8"),
    (["launch", "--project=p"], "unknown subcommand 'launch'"),
    (["run", "--project=p", "--zone=z", "--name=n"], "run needs the module"),
    (["run", "--project=p", "--zone=z", "--name=n", "--", "rm -rf /"], "is not a python module name"),
    (["stop", "--project=p", "--zone=z", "--name=n", "--wrker=all"], "unknown argument '--wrker=all'"),
])
def test_bad_arguments_are_refused(args, message):
    out = subprocess.run(["bash", TPU_VM, *args, "--dry-run"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_setup_sh_plan(tmp_path):
    out = subprocess.run(["bash", SETUP, "--dry-run", "--accelerator=tpu", f"--venv={tmp_path}/v",
                          "--extras=notebook"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    commands = [line[2:] for line in out.stdout.splitlines() if line.startswith("+ ")]
    assert commands[0].endswith(f"-m venv {tmp_path}/v")
    assert f"{tmp_path}/v/bin/python -m pip install --quiet -e {REPO}[tpu,notebook]" in commands
    assert commands[-1] == f"{tmp_path}/v/bin/python -"  # the preflight that prints the devices
    bad = subprocess.run(["bash", SETUP, "--accelerator=fpga"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "expected auto, tpu, gpu or cpu" in bad.stderr


def test_multiprocess_env_detection():
    assert runtime.multiprocess_env({}) is None
    assert runtime.multiprocess_env({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}) == "JAX_COORDINATOR_ADDRESS"
    assert runtime.multiprocess_env({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == "SLURM"
    assert runtime.multiprocess_env({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None  # one task: nothing to join
    assert runtime.multiprocess_env({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1"}) == "TPU_WORKER_HOSTNAMES"
    assert runtime.multiprocess_env({"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # a single-host TPU VM
    # Nothing says "several processes": nothing is initialised.
    assert runtime.initialize_distributed("auto", environ={}) is None
    with pytest.raises(ValueError, match="expected auto, true or false"):
        runtime.initialize_distributed("yes")
    with pytest.raises(ValueError, match="contradicts"):
        runtime.initialize_distributed("false", num_processes=2)
    with pytest.raises(ValueError, match=r"must be in \[0, --num_processes=2\)"):
        runtime.initialize_distributed("auto", coordinator_address="localhost:1", num_processes=2, process_id=2)


_JOIN = """
from jaxml import runtime
how = runtime.initialize_distributed("auto")
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((jax.device_count(),), ("d",))
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), np.full((2,), jax.process_index() + 1.0))
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
print(f"{how}: process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} devices, sum {float(total)}")
"""


def _slurm_port_and_job_id() -> tuple[int, int]:
    """A free port among those JAX derives from SLURM_JOB_ID (61440 + job id % 4096), and that job id."""
    import socket

    for job_id in range(1000, 4096):
        with socket.socket() as s:
            try:
                s.bind(("localhost", 61440 + job_id))
            except OSError:
                continue
            return 61440 + job_id, job_id
    pytest.skip("no free port in 61440..65535 for the SLURM coordinator")


@pytest.mark.slow  # two processes start JAX and join (~15 s on 2 shared cores)
def test_slurm_environment_alone_joins_the_processes():
    # What srun sets for a 2-task step on one node: the CLI's auto mode finds it, JAX's SLURM
    # cluster support derives the coordinator from it, and a collective spans both processes.
    _, job_id = _slurm_port_and_job_id()
    procs = []
    for i in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   SLURM_JOB_ID=str(job_id), SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                   SLURM_PROCID=str(i), SLURM_LOCALID=str(i))
        env.pop("JAX_COORDINATOR_ADDRESS", None)
        procs.append(subprocess.Popen([sys.executable, "-c", _JOIN], env=env, cwd=REPO, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out[-3000:]
        # 2 devices per process holding 1.0 (process 0) and 2.0 (process 1), twice each.
        assert f"SLURM: process {i} of 2, 4 devices, sum 6.0" in out, out[-3000:]


def test_slurm_and_gpu_scripts_parse():
    for script in ("slurm.sbatch", "gpu.sh"):
        out = subprocess.run(["bash", "-n", os.path.join(REPO, "launch", script)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    sbatch = open(os.path.join(REPO, "launch", "slurm.sbatch")).read()
    assert "#SBATCH --ntasks-per-node=1" in sbatch and "srun" in sbatch
