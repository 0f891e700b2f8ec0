"""Fault injection: run an experiment as a subprocess, SIGKILL it at random moments, rerun it
on the same workdir, and compare the end with an uninterrupted run bit for bit.

    python -m tests.faults cnn gpt --kills=3      # prints kills survived / tried per experiment

Kills alternate between two kinds of moment, each drawn at random:
  `random`  0-0.3 s after a random training step past the last checkpoint is logged
            (mid-step, mid-eval, between a step and its checkpoint, mid-save: wherever the
            run happens to be);
  `save`    the moment the 1st, 2nd or 3rd new checkpoint's temporary directory appears,
            i.e. while Orbax writes it asynchronously in the background.
A kill "survives" when the run, restarted on the same workdir until it finishes, ends with
checkpoints (train state, data position, RNG) and metrics.jsonl rows identical to the
uninterrupted run's (perf/steps_per_sec, a wall-clock rate, aside).
"""

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_MARK = ".orbax-checkpoint-tmp"
# Per experiment: enough steps that random kills land mid-run, frequent async checkpoints.
# Checkpoint cadences that are not multiples of log_every: a log row then averages steps from
# before and after a resume.
SETTINGS = {
    "cnn": dict(steps=60, every=5, log_every=2, eval_every=30),
    "gpt": dict(steps=40, every=5, log_every=2, eval_every=20),
    "gan": dict(steps=40, every=5, log_every=5, eval_every=0),
    "diffusion": dict(steps=24, every=4, log_every=2, eval_every=12),
}


def flags(name: str, workdir: str) -> list[str]:
    s = SETTINGS[name]
    return [f"--config=experiments/{name}.py:tiny", f"--workdir={workdir}", "--config.log.progress=False",
            f"--config.train.steps={s['steps']}", f"--config.checkpoint.every_steps={s['every']}",
            f"--config.train.log_every={s['log_every']}", f"--config.train.eval_every={s['eval_every']}"]


def env() -> dict:
    """The subprocess's environment: the 8-fake-device CPU topology the tests use."""
    e = dict(os.environ, JAX_PLATFORMS="cpu")
    if "--xla_force_host_platform_device_count" not in e.get("XLA_FLAGS", ""):
        e["XLA_FLAGS"] = (e.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    return e


def start(name: str, workdir: str) -> subprocess.Popen:
    """The run, its output appended to `<workdir>.log` (a pipe nobody reads while waiting to
    kill could fill up and stall the run)."""
    with open(f"{workdir}.log", "a") as out:
        return subprocess.Popen([sys.executable, "-m", f"experiments.{name}", *flags(name, workdir)], cwd=REPO,
                                env=env(), stdout=out, stderr=subprocess.STDOUT)


def output(workdir: str) -> str:
    with open(f"{workdir}.log") as f:
        return f.read()[-4000:]


def run_to_end(name: str, workdir: str, timeout: float = 600) -> None:
    p = start(name, workdir)
    if p.wait(timeout=timeout) != 0:
        raise AssertionError(f"{name} in {workdir} exited with {p.returncode}:\n{output(workdir)}")


def _tmp_dirs(workdir: str) -> list[str]:
    d = os.path.join(workdir, "checkpoints")
    return [n for n in os.listdir(d) if TMP_MARK in n] if os.path.isdir(d) else []


@dataclasses.dataclass
class Kill:
    mode: str  # random | save
    after_s: float  # seconds after the process started
    landed: bool  # False: the process had finished before the kill (not counted as tried)
    during_write: bool  # a temporary checkpoint directory was left behind by the kill


def kill_once(name: str, workdir: str, mode: str, rng: random.Random, expected_s: float) -> Kill:
    """Start the run and SIGKILL it at a moment chosen by `mode`."""
    before = set(_tmp_dirs(workdir))  # a killed write's leftovers, removed by the run at start
    steps = checkpoint_steps(workdir) if os.path.isdir(os.path.join(workdir, "checkpoints")) else []
    p = start(name, workdir)
    t0 = time.monotonic()
    if mode == "random":  # once a random training step past the last checkpoint is logged, plus up to 0.3 s
        cfg, last = SETTINGS[name], (steps[-1] if steps else 0)
        target = rng.choice([k for k in range(last + 1, cfg["steps"]) if k % cfg["log_every"] == 0] or [0])
        delay, stale = rng.uniform(0.0, 0.3), _max_logged_step(workdir) >= target
        while p.poll() is None and time.monotonic() - t0 < 3 * expected_s:
            # Rows a killed run logged past its checkpoint are stale until the new run rewinds the file.
            stale = stale and _max_logged_step(workdir) >= target
            if not stale and _max_logged_step(workdir) >= target:
                time.sleep(delay)
                break
            time.sleep(0.005)
    else:  # the first checkpoint write seen after a random number of saves skipped
        # Never more skips than the run has saves left after the checkpoint it resumes from
        # (a random kill late in the run leaves only the final save).
        cfg, last = SETTINGS[name], (steps[-1] if steps else 0)
        left = sum(1 for k in range(last + 1, cfg["steps"] + 1) if k % cfg["every"] == 0 or k == cfg["steps"])
        # Orbax names a write's temporary directory after its step alone, so a killed write's
        # leftover has the name the rerun's write of that step will have: a write is new once
        # the leftovers are gone (the run removes them at start) and a temporary directory is back.
        skip, seen, was = rng.randrange(max(1, min(3, left))), 0, bool(before)
        while p.poll() is None and time.monotonic() - t0 < 3 * expected_s:
            now = bool(_tmp_dirs(workdir))
            if now and not was:
                if seen == skip:
                    break
                seen += 1
            was = now
            time.sleep(0.001)
    landed = p.poll() is None
    if landed:
        p.send_signal(signal.SIGKILL)
    p.wait()
    after = time.monotonic() - t0
    if not landed and p.returncode != 0:
        raise AssertionError(f"{name} failed on its own (exit {p.returncode}):\n{output(workdir)}")
    # A save-mode kill landed on a write it saw begin; a random one, if a write other than the leftovers was open.
    return Kill(mode, after, landed, landed and (mode == "save" or bool(set(_tmp_dirs(workdir)) - before)))


def _max_logged_step(workdir: str) -> int:
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            lines = f.readlines()
    except FileNotFoundError:
        return -1
    steps = [json.loads(line)["step"] for line in lines if line.endswith("\n")]
    return max(steps, default=-1)


def checkpoint_steps(workdir: str) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def read_checkpoint(workdir: str, step: int) -> dict:
    """A checkpoint's arrays (as numpy, no target needed) and its JSON items."""
    import absl.logging
    import jax
    import orbax.checkpoint as ocp

    absl.logging.set_verbosity(absl.logging.ERROR)
    path = os.path.join(workdir, "checkpoints", str(step))
    # As host numpy arrays: the checkpoint's 8-device shardings need not exist in this process.
    reader = ocp.PyTreeCheckpointer()
    tree = reader.metadata(os.path.join(path, "state")).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = reader.restore(os.path.join(path, "state"), args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    out = {"state": {k: np.asarray(v) for k, v in _flat(state).items()}}
    for item in ("meta", "config"):
        with open(os.path.join(path, item, "metadata")) as f:
            out[item] = json.load(f)
    for key in ("log_window", "metrics_size"):  # compared through metrics.jsonl (whose length includes
        out["meta"].pop(key, None)          # the wall-clock perf/steps_per_sec values)
    data = os.path.join(path, "data")
    out["data"] = {n: open(os.path.join(data, n)).read() for n in sorted(os.listdir(data)) if n.endswith(".json")}
    return out


def _flat(tree, prefix="") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}/").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix}{i}/").items()}
    return {prefix.rstrip("/"): tree}


def metric_rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{k: v for k, v in r.items() if k != "perf/steps_per_sec"} for r in rows]


def differences(reference: str, workdir: str) -> list[str]:
    """Every way `workdir`'s end differs from `reference`'s (empty: bit-identical)."""
    diffs = []
    ref_steps, steps = checkpoint_steps(reference), checkpoint_steps(workdir)
    if ref_steps != steps:
        diffs.append(f"checkpoint steps {steps} != {ref_steps}")
    for step in sorted(set(ref_steps) & set(steps)):
        a, b = read_checkpoint(reference, step), read_checkpoint(workdir, step)
        for item in ("meta", "config", "data"):
            if a[item] != b[item]:
                diffs.append(f"step {step} {item}: {b[item]} != {a[item]}")
        if sorted(a["state"]) != sorted(b["state"]):
            diffs.append(f"step {step} state leaves differ: {sorted(set(a['state']) ^ set(b['state']))}")
        for k in sorted(set(a["state"]) & set(b["state"])):
            x, y = a["state"][k], b["state"][k]
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                diffs.append(f"step {step} state {k}: not bit-identical (max |diff| "
                             f"{np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))) if x.shape == y.shape else '-'})")
    ra, rb = metric_rows(reference), metric_rows(workdir)
    if ra != rb:
        first = next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), min(len(ra), len(rb)))
        diffs.append(f"metrics.jsonl differs from row {first}: {rb[first:first + 2]} != {ra[first:first + 2]}")
    return diffs


@dataclasses.dataclass
class Report:
    experiment: str
    kills: list[Kill]
    restarts: int
    differences: list[str]

    @property
    def tried(self) -> int:
        return sum(k.landed for k in self.kills)

    @property
    def survived(self) -> int:
        return self.tried if not self.differences else 0

    def line(self) -> str:
        during = sum(k.during_write for k in self.kills)
        return (f"{self.experiment}: kills survived {self.survived}/{self.tried} "
                f"({during} during an async checkpoint write; moments "
                + ", ".join(f"{k.mode}@{k.after_s:.1f}s" for k in self.kills if k.landed) + ")")


def kill_and_resume(name: str, workdir: str, reference: str, kills: int, seed: int = 0,
                    expected_s: float | None = None) -> Report:
    """SIGKILL `name` `kills` times (at moments drawn from `seed`) on `workdir`, run it to the end, compare."""
    rng = random.Random(seed)
    if expected_s is None:  # one uninterrupted subprocess run's duration: the reference's, re-timed here
        t0 = time.monotonic()
        run_to_end(name, reference)
        expected_s = time.monotonic() - t0
    done: list[Kill] = []
    attempts = 0
    first = rng.randrange(2)
    while len(done) < kills:
        attempts += 1
        kill = kill_once(name, workdir, ("random", "save")[(len(done) + first) % 2], rng, expected_s)
        done.append(kill)
        if not kill.landed:  # the run finished before the kill: start over on a fresh workdir
            break
    run_to_end(name, workdir)
    return Report(name, done, attempts + 1, differences(reference, workdir))


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="+", choices=sorted(SETTINGS))
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name in args.experiments:
        with tempfile.TemporaryDirectory() as tmp:
            report = kill_and_resume(name, os.path.join(tmp, "killed"), os.path.join(tmp, "ref"), args.kills,
                                     args.seed)
        print(report.line(), flush=True)
        for d in report.differences:
            print("  ", d)
