"""The command line: JSON configs, bad values rejected before anything compiles."""

import json
import os
import subprocess
import sys

from tests.test_engine import cli


def test_json_config_of_a_previous_run_reruns_it_with_overrides(tmp_path):
    first = cli("--config=experiments/cnn.py:tiny", "--config.train.steps=4", "--config.model.dense=24",
                f"--workdir={tmp_path / 'a'}")
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    again = cli(f"--config={tmp_path / 'a' / 'config.json'}", "--config.train.steps=6", f"--workdir={tmp_path / 'b'}")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["train"]["steps"] == 6 and config["model"]["dense"] == 24 and config["model"]["features"] == [8]


def test_json_config_with_an_unknown_key_names_it(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"optim": {"lrr": 0.1}}))
    p = cli(f"--config={tmp_path / 'bad.json'}", f"--workdir={tmp_path / 'w'}")
    out, _ = p.communicate(timeout=300)
    assert p.returncode != 0 and "unknown key 'optim.lrr'" in out and "weight_decay" in out, out


def test_invalid_value_is_a_one_line_error_before_training(tmp_path):
    p = cli("--config=experiments/cnn.py:tiny", "--config.optim.lr=-1", f"--workdir={tmp_path}")
    out, _ = p.communicate(timeout=300)
    assert p.returncode != 0 and "error: " in out and "lr" in out and "Traceback" not in out, out
    assert not (tmp_path / "checkpoints").exists()


def test_cpu_devices_runs_the_step_data_parallel_over_the_split_cpu(tmp_path):
    # Without the suite's 8-device flag, so that --cpu_devices decides the count.
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "experiments.cnn", "--config=experiments/cnn.py:tiny",
                               "--config.train.steps=4", *args], env=env, capture_output=True, text=True, timeout=300)

    ok = run(f"--workdir={tmp_path / 'a'}", "--cpu_devices=2")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    shardings = (tmp_path / "a" / "checkpoints" / "4" / "state" / "_sharding").read_text()
    assert '\\"shape\\": [2, 1, 1]' in shardings  # the state lives on a 2-device data-parallel mesh
    bad = run(f"--workdir={tmp_path / 'b'}", "--cpu_devices=0")
    assert bad.returncode != 0 and "error: --cpu_devices" in bad.stdout + bad.stderr
    assert "Traceback" not in bad.stdout + bad.stderr
