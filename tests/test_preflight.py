"""--preflight: the train step compiled for a topology this machine does not have, with the
per-device memory, FLOPs and compile time printed; TPU slices through libtpu's compile-only
devices where libtpu is installed, otherwise (and for GPUs) on as many fake CPU devices."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from jaxml import preflight
from tests.test_engine import REPO

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.parametrize("spec,platform,n,topology", [
    ("v5e-16", "tpu", 16, "v5e:4x4"), ("v5litepod-8", "tpu", 8, "v5e:2x4"), ("v6e-8", "tpu", 8, "v6e:2x4"),
    ("v4-32", "tpu", 16, "v4:2x2x4"), ("v5p-8", "tpu", 4, "v5p:2x2x1"), ("v4:2x2x2", "tpu", 8, "v4:2x2x2"),
    ("8xH100", "gpu", 8, None), ("16xA100", "gpu", 16, None), ("cpu:8", "cpu", 8, None),
])
def test_parse_topology(spec, platform, n, topology):
    target = preflight.parse_topology(spec)
    assert (target.platform, target.num_devices, target.tpu_topology) == (platform, n, topology)


@pytest.mark.parametrize("spec,message", [("v4-12", "known sizes: v4-8, v4-16, v4-32"), ("tpu", "examples: v5e-16"),
                                          ("H100", "examples"), ("v5e-3", "known sizes")])
def test_unknown_topology_is_an_error_with_examples(spec, message):
    with pytest.raises(ValueError, match=message):
        preflight.parse_topology(spec)


def _preflight(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "experiments.gpt", "--config=experiments/gpt.py:tiny", "--preflight",
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _figures(stdout):
    memory = re.search(r"per-device memory: ([0-9.,]+) MiB \(arguments ([0-9.,]+) MiB", stdout)
    flops = re.search(r"FLOPs per step: ([0-9.e+]+) per device, ([0-9.e+]+) in all", stdout)
    compile_s = re.search(r"compile time: ([0-9.]+) s", stdout)
    assert memory and flops and compile_s, stdout
    return float(memory[1].replace(",", "")), float(memory[2].replace(",", "")), float(flops[1]), float(flops[2])


@pytest.mark.slow  # compiles the GPT step for 16 devices in a fresh process (~10 s CPU)
def test_gpt_preflight_on_a_slice_larger_than_this_machine():
    out = _preflight("--topology=v4-32", "--config.parallel.mesh.data=4", "--config.parallel.mesh.fsdp=4")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "on v4-32: 16 devices" in out.stdout
    if HAS_LIBTPU:
        assert "compile-only TPU v4 devices from libtpu (v4:2x2x4)" in out.stdout
    else:
        assert "16 fake CPU devices instead (v4-32 cannot be described offline without libtpu)" in out.stdout
    assert "mesh: data=4 fsdp=4 tensor=1; global batch 16 (1 per data-parallel device)" in out.stdout
    peak, arguments, per_device, total = _figures(out.stdout)
    assert 0 < arguments <= peak and 0 < per_device and total == pytest.approx(16 * per_device, rel=1e-3)


@pytest.mark.slow
def test_gpu_target_says_it_cannot_be_described_offline():
    out = _preflight("--topology=8xH100")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "8xH100 cannot be described offline" in out.stdout and "8 fake CPU devices instead" in out.stdout
    _figures(out.stdout)


def test_a_batch_that_does_not_split_over_the_target_is_an_error():
    out = _preflight("--topology=cpu:32")  # the tiny preset's batch of 16 over 32 devices
    assert out.returncode != 0
    assert "data.batch_size=16 (the global batch) must be divisible by the data-parallel size 32" in out.stderr


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install libtpu, or jaxml[tpu]) for compile-only TPU devices")
def test_v5e_preflight_compiles_for_the_real_tpu():
    out = _preflight("--topology=v5e-16")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "compile-only TPU v5 lite devices from libtpu (v5e:4x4)" in out.stdout
    _figures(out.stdout)
