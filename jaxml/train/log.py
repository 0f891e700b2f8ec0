"""Metric writers (metrics.jsonl, optional TensorBoard) and the console progress line."""

import json
import math
import os
import sys
import time
from typing import Mapping

import jax
import numpy as np


def _scalar(v) -> float:
    return float(np.asarray(v))


class MetricWriter:
    """Appends one JSON object per logged step to `workdir/metrics.jsonl` (process 0 only).

    Keys are namespaced (`train/loss`, `eval/accuracy`, `perf/steps_per_sec`). With
    `tensorboard=True` and tensorboardX installed, the same scalars go to TensorBoard.
    """

    def __init__(self, workdir: str, tensorboard: bool = False):
        self.active = jax.process_index() == 0
        self._file = None
        self._tb = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        # Appending keeps the history of a resumed run in one file.
        self._file = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            try:
                import tensorboardX
            except ImportError as e:
                raise ImportError("log.tensorboard=True needs tensorboardX: pip install 'jaxml[tensorboard]'") from e
            self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Log scalars for `step`; non-finite values are written as strings ('nan', 'inf')."""
        if not self.active:
            return
        row = {"step": int(step)}
        for k, v in metrics.items():
            x = _scalar(v)
            row[k] = x if math.isfinite(x) else str(x)
            if self._tb is not None:
                self._tb.add_scalar(k, x, int(step))
        self._file.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """The rows of `workdir/metrics.jsonl`, in order."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """A one-line console progress bar: step, steps/s, ETA, and the latest loss."""

    def __init__(self, total_steps: int, first_step: int = 0, stream=None, width: int = 24):
        self.total = total_steps
        self.stream = stream or sys.stderr
        self.width = width
        self.active = jax.process_index() == 0
        self.tty = self.stream.isatty()
        self._t0 = time.perf_counter()
        self._s0 = first_step
        self._last_print = 0.0

    def steps_per_sec(self, step: int) -> float:
        dt = time.perf_counter() - self._t0
        return (step - self._s0) / dt if dt > 0 and step > self._s0 else 0.0

    def update(self, step: int, metrics: Mapping[str, float], force: bool = False) -> None:
        """Redraw (a tty: at most 10x/s in place; a log file: at most every 10 s)."""
        if not self.active:
            return
        now = time.perf_counter()
        if not force and now - self._last_print < (0.1 if self.tty else 10.0):
            return
        self._last_print = now
        rate = self.steps_per_sec(step)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        done = int(self.width * step / max(self.total, 1))
        bar = "#" * done + "." * (self.width - done)
        shown = "  ".join(f"{k.split('/')[-1]} {_scalar(v):.4g}" for k, v in metrics.items()
                          if k in ("train/loss", "train/accuracy"))
        eta_s = "?" if math.isnan(eta) else time.strftime("%M:%S", time.gmtime(eta)) if eta < 3600 \
            else f"{eta / 3600:.1f}h"
        line = f"[{bar}] {step}/{self.total}  {rate:.1f} steps/s  ETA {eta_s}  {shown}"
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.active and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def info(msg: str) -> None:
    """A console message from process 0."""
    if jax.process_index() == 0:
        print(msg, flush=True)
