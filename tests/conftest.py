"""Every test runs on 8 fake CPU devices, so sharded and pmap paths really run."""

import os
import tempfile

# Before jax is imported anywhere: XLA reads the flag once, at backend start.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Datasets prepared by tests go to a throwaway dir, never the user's ~/tensorflow_datasets.
# Each pytest-xdist worker gets its own (it would otherwise inherit the controller's and two
# workers would prepare the same dataset into one dir at once).
if "PYTEST_XDIST_WORKER" in os.environ or "TFDS_DATA_DIR" not in os.environ:
    os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="jaxml-tfds-")
# A compilation cache for the session (subprocesses inherit it): resume and parity tests
# compile the same programs again, and a cached executable is the same program, so the
# numbers are unchanged.
if "PYTEST_XDIST_WORKER" in os.environ or "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxml-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxml import runtime  # noqa: E402

# As the CLI does, before the backend starts (pytest_configure below starts it).
runtime.keep_host_memory()
runtime.multithreaded_convolutions()
runtime.unrolled_threefry()


def pytest_configure(config):
    assert jax.device_count() == 8, f"tests expect 8 fake CPU devices, got {jax.device_count()}"


@pytest.fixture(scope="session")
def data_dir():
    """The TFDS data dir shared by the session (digits are prepared into it once)."""
    return os.environ["TFDS_DATA_DIR"]
