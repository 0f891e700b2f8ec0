"""metrics.jsonl, TensorBoard events and the console progress line."""

import io
import json
import os

from jaxml.train import log


def test_metric_writer_appends_namespaced_rows_and_marks_nonfinite(tmp_path):
    writer = log.MetricWriter(str(tmp_path))
    writer.write(10, {"train/loss": 0.5, "perf/steps_per_sec": 12.0})
    writer.write(20, {"eval/accuracy": float("nan")})
    writer.close()
    again = log.MetricWriter(str(tmp_path))  # a resumed run appends to the same file
    again.write(30, {"train/loss": 0.25})
    again.close()
    rows = log.read_metrics(str(tmp_path))
    assert rows == [{"step": 10, "train/loss": 0.5, "perf/steps_per_sec": 12.0},
                    {"step": 20, "eval/accuracy": "nan"}, {"step": 30, "train/loss": 0.25}]
    for line in open(tmp_path / "metrics.jsonl"):
        json.loads(line)  # strict JSON: no bare NaN


def test_tensorboard_events_are_written(tmp_path):
    writer = log.MetricWriter(str(tmp_path), tensorboard=True)
    writer.write(1, {"train/loss": 1.0})
    writer.close()
    events = os.listdir(tmp_path / "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in events), events
    assert os.path.getsize(tmp_path / "tensorboard" / events[0]) > 0


def test_progress_line_shows_rate_eta_and_loss():
    out = io.StringIO()
    progress = log.Progress(total_steps=100, stream=out)
    progress.update(50, {"train/loss": 0.123456, "train/grad_norm": 3.0}, force=True)
    line = out.getvalue()
    assert "50/100" in line and "steps/s" in line and "ETA" in line and "loss 0.1235" in line
    assert "grad_norm" not in line
