"""jaxml.runtime: kept host memory (XLA:CPU's per-step temporaries stop being page-faulted in again),
multithreaded convolutions (jaxlib 0.10's single-threaded YNNPACK convolutions go to Eigen) and
threefry unrolled on CPU (the same random bits without the rolled loop)."""

import json
import os
import platform
import subprocess
import sys
import warnings

import numpy as np
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
faults = []
for _ in range(42):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(a, b).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults[2:])
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_host_memory tunes glibc's malloc")
def test_kept_host_memory_stops_per_call_page_faults_of_the_temporaries():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user's run
    faulting = {}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, env=env,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        setting, per_call = out.stdout.split("\n")[:2]
        assert (setting == "None") == (mode == "off"), setting
        # 72 MB is 18,432 pages: a call that faults its temporary in again counts about that many.
        faulting[mode] = [n for n in json.loads(per_call) if n > 9000]
    # glibc hands the block back after every call unless kept. Kept, the heap grows by a few blocks
    # before it settles (a call's block allocated before the last one's is freed lands in fresh
    # memory, and an aligned block cannot reuse a freed one of its own size), then no call faults:
    # 1-5 calls in 40 on a 2-core VM with 3 busy processes beside it.
    assert len(faulting["off"]) == 40 and len(faulting["on"]) <= 10, faulting


def test_disabled_is_a_no_op_and_a_late_call_warns():
    assert runtime.keep_host_memory(False) is None
    if platform.libc_ver()[0] == "glibc":
        import jax

        jax.devices()  # the suite's backend is up: too late for XLA's own threads
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert "M_ARENA_MAX=1" in runtime.keep_host_memory()
        assert any("before JAX started" in str(w.message) or "after JAX started" in str(w.message) for w in caught)


_SPLIT = """
import sys
from jaxml import runtime
print(runtime.cpu_devices(int(sys.argv[1])))
import jax
print(jax.device_count())
"""


def _printed(code: str, arg: str, xla_flags: str | None = None) -> list[str]:
    """The lines `code` prints, run with `arg` in a fresh Python whose XLA_FLAGS are `xla_flags` (none if None)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    out = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n")


def _split_in_subprocess(count: int, xla_flags: str | None = None) -> tuple[str, int]:
    flag, devices = _printed(_SPLIT, str(count), xla_flags)[:2]
    return flag, int(devices)


def test_cpu_devices_splits_the_host_cpu_before_jax_starts():
    assert _split_in_subprocess(2) == ("--xla_force_host_platform_device_count=2", 2)
    assert _split_in_subprocess(1) == ("None", 1)
    assert _split_in_subprocess(3, "--xla_force_host_platform_device_count=4") == ("None", 4)  # a set count stands
    for bad in (0, -2, True, 2.0):
        with pytest.raises(ValueError, match="expected a device count"):
            runtime.cpu_devices(bad)
    import jax

    jax.devices()  # the suite's backend is up; without its count in XLA_FLAGS the call is too late
    saved = os.environ["XLA_FLAGS"]
    try:
        os.environ["XLA_FLAGS"] = saved.replace("--xla_force_host_platform_device_count=8", "")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert runtime.cpu_devices(2) is None
        assert "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]
    finally:
        os.environ["XLA_FLAGS"] = saved
    assert any("after JAX started" in str(w.message) for w in caught)


# A ResNet-20 stage-2 convolution (32 channels: YNNPACK takes it in jaxlib 0.10) and its two gradients.
_CONV = """
import sys, time
from jaxml import runtime
print(runtime.multithreaded_convolutions(sys.argv[1] == "on"))
import jax, jax.numpy as jnp, numpy as np
from jax import lax
conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
x = jax.random.normal(jax.random.key(0), (64, 16, 16, 32))
w = jax.random.normal(jax.random.key(1), (3, 3, 32, 32)) * 0.1
def step(x, w):  # no reductions or dots: YNNPACK's name in the program means it runs a convolution
    y, vjp = jax.vjp(conv, x, w)
    return (y, *vjp(y))
compiled = jax.jit(step).lower(x, w).compile()
print("ynn" in compiled.as_text())
print(float(sum(jnp.vdot(a, a) for a in compiled(x, w))))
"""


def _conv_in_subprocess(mode: str, xla_flags: str | None = None):
    flag, on_ynn, loss = _printed(_CONV, mode, xla_flags)[:3]
    return flag, on_ynn == "True", float(loss)


def test_multithreaded_convolutions_moves_jaxlib_010_convolutions_off_ynnpack():
    flag_on, ynn_on, loss_on = _conv_in_subprocess("on")
    flag_off, ynn_off, loss_off = _conv_in_subprocess("off")
    assert flag_off == "None"
    if runtime.jaxlib_version() < (0, 11):
        assert flag_on == "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce"
        assert ynn_off and not ynn_on, (ynn_off, ynn_on)  # the test can tell: jaxlib 0.10 puts it on YNNPACK
    else:  # jaxlib 0.12's YNNPACK convolutions use every core: nothing to change
        assert flag_on == "None" and ynn_on == ynn_off
    assert loss_on == pytest.approx(loss_off, rel=1e-5)  # the same convolution, another library


def test_multithreaded_convolutions_leaves_a_users_choice_and_warns_when_late():
    chosen = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution,reduce"
    flag, on_ynn, _ = _conv_in_subprocess("on", chosen)
    assert flag == "None" and on_ynn
    assert runtime.multithreaded_convolutions(False) is None
    assert "xla_cpu_experimental_ynn_fusion_type" not in runtime.step_compiler_options("cpu")  # off for the steps too
    runtime.multithreaded_convolutions()  # back on (the suite's flag is in XLA_FLAGS: nothing else changes)
    if runtime.jaxlib_version() < (0, 11):
        import jax

        jax.devices()  # the suite's backend is up (conftest already set the flag: drop it to see the warning)
        saved = os.environ["XLA_FLAGS"]
        try:
            os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                assert runtime.multithreaded_convolutions() is None
            assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
        finally:
            os.environ["XLA_FLAGS"] = saved
        assert any("after JAX started" in str(w.message) for w in caught)


# The engine's train step of a "model" that is one convolution (the same 32-channel one), compiled
# by parallel.setup in a process whose XLA_FLAGS carry no fusion setting; argv[1] "default" leaves
# jaxml.runtime alone (research code that never calls it), "off" calls multithreaded_convolutions(False).
_ENGINE_CONV = """
import sys
from jaxml import runtime
if sys.argv[1] == "off":
    runtime.multithreaded_convolutions(False)
import flax.struct, jax, jax.numpy as jnp, ml_collections
from jax import lax
from jaxml.train import parallel
@flax.struct.dataclass
class State:
    step: jax.Array
    w: jax.Array
def init(rng, batch):
    return State(step=jnp.zeros((), jnp.int32), w=jax.random.normal(rng, (3, 3, 32, 32)) * 0.1)
def train_step(state, batch, rng):  # no reductions or dots: YNNPACK's name means the convolution
    y = lax.conv_general_dilated(batch["x"], state.w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return state, {"y": y}
batch = {"x": jax.random.normal(jax.random.key(0), (64, 16, 16, 32))}
cfg = parallel.default_config()
placement = parallel.setup(cfg, init_fn=init, train_step=train_step, eval_step=None, example_batch=batch,
                           global_batch_size=64, devices=jax.devices()[:1])
state = placement.init(jax.random.key(1), batch)
compiled = placement.train_step.lower(state, placement.place_batch(batch), jax.random.key(2)).compile()
print("ynn" in compiled.as_text())
"""


def _engine_conv_on_ynnpack(mode: str) -> bool:
    return _printed(_ENGINE_CONV, mode)[0] == "True"


def test_engine_steps_get_multithreaded_convolutions_without_the_process_flag():
    """Research code that never calls jaxml.runtime (or a notebook that calls it after JAX started)
    still gets Eigen's multithreaded convolutions in the engine's steps: per program."""
    default, off = _engine_conv_on_ynnpack("default"), _engine_conv_on_ynnpack("off")
    if runtime.jaxlib_version() < (0, 11):
        assert off and not default, (off, default)
    else:  # nothing to change: YNNPACK's convolutions use every core there
        assert off == default
        assert "xla_cpu_experimental_ynn_fusion_type" not in runtime.step_compiler_options("cpu")
    assert runtime.step_compiler_options("gpu") == {}


def test_step_compiler_options_leave_a_users_flags_and_the_off_switch(monkeypatch):
    region = {"xla_cpu_copy_insertion_use_region_analysis": True}
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot")
    assert runtime.step_compiler_options("cpu") == region
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    convolutions = {} if runtime.jaxlib_version() >= (0, 11) else {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
    assert runtime.step_compiler_options("cpu") == {**region, **convolutions}
    monkeypatch.setattr(runtime, "_convolutions_wanted", [False])
    assert runtime.step_compiler_options("cpu") == region
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_copy_insertion_use_region_analysis=false")
    assert runtime.step_compiler_options("cpu") == {}
    assert not runtime._accepts("xla_cpu_no_such_option", True)  # an older jaxlib's XLA: left out


def test_unrolled_threefry_keeps_the_random_bits_and_drops_the_loops():
    """conftest calls it as the CLI does; JAX's own CPU lowering (enabled=False) rolls the hash into while loops."""
    import jax

    def draw():  # a new function each time: jit caches lowered programs per function
        return jax.jit(lambda key: (jax.random.normal(key, (64,)), jax.random.bernoulli(jax.random.split(key)[1],
                                                                                      0.5, (8, 8))))

    key = jax.random.key(3)
    try:
        assert runtime.unrolled_threefry(False) == "threefry rolled on CPU (JAX's default)"
        rolled_fn = draw()
        assert " while(" in rolled_fn.lower(key).compile().as_text()
        rolled = rolled_fn(key)
    finally:
        assert runtime.unrolled_threefry() == "threefry unrolled on CPU"  # the installed JAX still has the hook
    unrolled_fn = draw()
    assert " while(" not in unrolled_fn.lower(key).compile().as_text()
    for a, b in zip(rolled, unrolled_fn(key)):
        np.testing.assert_array_equal(a, b)
