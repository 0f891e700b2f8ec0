"""The persistent compilation cache is on by default: a second run in a fresh process
compiles nothing new (it loads every program from the cache), and --compile_cache=false
writes none."""

import os
import re
import subprocess
import sys

import pytest

from jaxml import runtime
from tests.test_engine import REPO

ARGS = ["--config=experiments/cnn.py:tiny", "--config.train.steps=4", "--config.train.eval_every=0"]


def _run(workdir, *extra, cache_env=None):
    # The suite's own cache settings (tests/conftest.py) are taken away, so the CLI's defaults apply.
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    env.update(JAX_PLATFORMS="cpu", **(cache_env or {}))
    out = subprocess.run([sys.executable, "-m", "experiments.cnn", *ARGS, f"--workdir={workdir}", *extra],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


# The engine's programs: init, the train step and the eval step. (Small helper programs may or
# may not pass the compile-time threshold on a busy machine, so they are not counted.)
ENGINE = ("jit_unboxed_init-", "jit_step-", "jit_eval_step-")


def _files(directory) -> set[str]:
    return {f for _, _, fs in os.walk(directory) for f in fs if f.startswith(ENGINE)}


def _compile_seconds(stdout: str) -> float:
    m = re.search(r"train step compiled in ([0-9.]+) s \(compilation cache: (.*)\)", stdout)
    assert m, stdout[-2000:]
    return float(m[1])


@pytest.mark.slow  # three CLI runs, each starting JAX (about 30 s on 2 shared cores)
def test_second_run_loads_every_program_from_the_cache(tmp_path):
    cache = tmp_path / "xla"
    # The default directory comes from $JAXML_CACHE_DIR (else ~/.cache/jaxml/xla).
    first = _run(tmp_path / "run1", cache_env={"JAXML_CACHE_DIR": str(cache)})
    written = _files(cache)
    assert {f.split("-")[0] + "-" for f in written} == set(ENGINE), \
        f"the first run did not cache every engine program (compile-time threshold too high?): {written}"
    second = _run(tmp_path / "run2", f"--compile_cache_dir={cache}")
    assert _files(cache) == written, "the second run compiled engine programs the first had cached"
    print(f"train step: compiled in {_compile_seconds(first):.2f} s, loaded from the cache in "
          f"{_compile_seconds(second):.2f} s")

    off = tmp_path / "off"
    stdout = _run(tmp_path / "run3", "--compile_cache=false", cache_env={"JAXML_CACHE_DIR": str(off)})
    assert "(compilation cache: off)" in stdout
    assert not off.exists() or not _files(off)


def test_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXML_CACHE_DIR", str(tmp_path / "c"))
    assert runtime.default_cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv("JAXML_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert runtime.default_cache_dir() == os.path.join(str(tmp_path), ".cache", "jaxml", "xla")

