"""Kill anywhere, resume exactly: SIGKILL experiments at random moments (some during an async
checkpoint write), rerun them on the same workdir, and compare with an uninterrupted run bit
for bit (tests/faults.py). The CNN always; the GPT, the GAN (two optimizers) and diffusion
(EMA) behind the slow marker."""

import json
import shutil

import pytest

from tests import faults


def _survives(name, tmp_path, kills, seed):
    report = faults.kill_and_resume(name, str(tmp_path / "killed"), str(tmp_path / "ref"), kills=kills, seed=seed)
    print(report.line())
    assert report.differences == [], "\n".join(report.differences)
    assert report.tried == kills, report.line()
    assert any(k.mode == "save" for k in report.kills), report.line()


def test_cnn_survives_sigkills_bit_identically(tmp_path):
    _survives("cnn", tmp_path, kills=2, seed=0)
    # The comparison can fail: a data position one batch on, a metric 1e-12 off.
    reference = tmp_path / "ref"
    shutil.copytree(reference, tmp_path / "data")
    data = tmp_path / "data" / "checkpoints" / "60" / "data" / "process_0-of-1.json"
    data.write_text(json.dumps({"next_index": 61}))
    assert [d for d in faults.differences(str(reference), str(tmp_path / "data")) if "step 60 data" in d]
    shutil.copytree(reference, tmp_path / "metric")
    rows = (tmp_path / "metric" / "metrics.jsonl").read_text().splitlines()
    row = json.loads(rows[3])
    row["train/loss"] += 1e-12
    (tmp_path / "metric" / "metrics.jsonl").write_text("\n".join(rows[:3] + [json.dumps(row)] + rows[4:]) + "\n")
    assert [d for d in faults.differences(str(reference), str(tmp_path / "metric")) if "metrics.jsonl" in d]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt", "gan", "diffusion"])
def test_experiment_survives_sigkills_bit_identically(tmp_path, name):
    _survives(name, tmp_path, kills=2, seed=1)
