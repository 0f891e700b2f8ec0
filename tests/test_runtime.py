"""jaxml.runtime.keep_host_memory: XLA:CPU's per-step temporaries stop being page-faulted in again."""

import os
import platform
import subprocess
import sys
import warnings

import pytest

from jaxml import runtime

# One call's program has a 72 MB temporary (the first matmul's output), freed after each call.
_FAULTS = """
import resource, sys
from jaxml import runtime
print(runtime.keep_host_memory(sys.argv[1] == "on"))
import jax, jax.numpy as jnp
f = jax.jit(lambda a, b: jnp.tanh(a @ b) @ b.T)
a, b = jnp.ones((4608, 16)), jnp.ones((16, 4096))
assert f.lower(a, b).compile().memory_analysis().temp_size_in_bytes >= 72 * 2**20
windows = []
for _ in range(9):  # the first windows may still grow the heap
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        f(a, b).block_until_ready()
    windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
print(sorted(windows)[4], windows)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_host_memory tunes glibc's malloc")
def test_kept_host_memory_stops_per_call_page_faults_of_the_temporaries():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user's run
    faults = {}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, env=env,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        setting, per_call = out.stdout.split("\n")[:2]
        faults[mode] = float(per_call.split()[0])
        assert (setting == "None") == (mode == "off"), setting
    # 72 MB is 18,432 pages: glibc hands the block back after every call unless kept.
    assert faults["off"] > 9000 and faults["on"] < 1000, faults


def test_disabled_is_a_no_op_and_a_late_call_warns():
    assert runtime.keep_host_memory(False) is None
    if platform.libc_ver()[0] == "glibc":
        import jax

        jax.devices()  # the suite's backend is up: too late for XLA's own threads
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert "M_ARENA_MAX=1" in runtime.keep_host_memory()
        assert any("before JAX started" in str(w.message) or "after JAX started" in str(w.message) for w in caught)
