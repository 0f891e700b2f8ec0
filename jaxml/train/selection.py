"""Model selection: train/validation/test splits, early stopping, k-fold cross-validation.

Splits are TFDS split strings, so a validation split carved from train and the folds of
k-fold are absolute-index slices (`train[:1200]`, `train[:300]+train[600:]`) that read
exactly the examples they name through the same `tfds.data_source` path as any split.
"""

import dataclasses
import json
import os
import types

import ml_collections
import numpy as np

from jaxml import data as data_lib
from jaxml.train import log


@dataclasses.dataclass(frozen=True)
class Splits:
    train: str
    validation: str | None  # None: no validation split; periodic eval uses the test split
    test: str


def _size(dc, split: str) -> int:
    sizes = data_lib.dataset_info(dc.name, dc.data_dir).num_examples
    if split not in sizes:
        raise ValueError(f"data.validation_fraction and eval.kfold carve a plain split; data.train_split="
                         f"{split!r} is not one of {sorted(sizes)} (slice it yourself with "
                         f"data.train_split and data.validation_split instead)")
    return sizes[split]


def resolve_splits(dc: ml_collections.ConfigDict) -> Splits:
    """The run's splits from `config.data`: an explicit validation split, or the last
    `validation_fraction` of the train split, or none."""
    if dc.validation_split:
        return Splits(dc.train_split, dc.validation_split, dc.eval_split)
    if dc.validation_fraction > 0:
        if not dc.validation_fraction < 1:
            raise ValueError(f"data.validation_fraction must be in [0, 1), got {dc.validation_fraction}")
        n = _size(dc, dc.train_split)
        cut = n - max(1, round(n * dc.validation_fraction))
        return Splits(f"{dc.train_split}[:{cut}]", f"{dc.train_split}[{cut}:]", dc.eval_split)
    return Splits(dc.train_split, None, dc.eval_split)


def kfold_splits(dc: ml_collections.ConfigDict, k: int) -> list[tuple[str, str]]:
    """(train, validation) split strings of the k folds: the validation parts are disjoint
    and together cover the train split exactly once."""
    n = _size(dc, dc.train_split)
    if not 2 <= k <= n:
        raise ValueError(f"eval.kfold must be in [2, {n}] for {n} training examples, got {k}")
    base, folds = dc.train_split, []
    for i in range(k):
        lo, hi = i * n // k, (i + 1) * n // k
        parts = ([f"{base}[:{lo}]"] if lo > 0 else []) + ([f"{base}[{hi}:]"] if hi < n else [])
        folds.append(("+".join(parts), f"{base}[{lo}:{hi}]"))
    return folds


@dataclasses.dataclass
class EarlyStopping:
    """Tracks a validation metric; `should_stop` after `patience` evals without improving
    by more than `min_delta`. Its fields are saved in checkpoints, so a resumed run goes on
    counting where it stopped."""

    metric: str
    mode: str
    patience: int
    min_delta: float
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped: bool = False

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> "EarlyStopping":
        if cfg.mode not in ("min", "max"):
            raise ValueError(f"train.early_stopping.mode must be 'min' or 'max', got {cfg.mode!r}")
        if cfg.patience < 0 or cfg.min_delta < 0:
            raise ValueError(f"train.early_stopping.patience and min_delta must be >= 0, got "
                             f"{cfg.patience} and {cfg.min_delta}")
        return cls(metric=cfg.metric, mode=cfg.mode, patience=cfg.patience, min_delta=cfg.min_delta)

    @property
    def enabled(self) -> bool:
        return self.patience > 0

    @property
    def should_stop(self) -> bool:
        return self.bad_evals >= self.patience

    def update(self, step: int, metrics: dict) -> bool:
        """Record one eval; True when it is the best so far."""
        if self.metric not in metrics:
            raise KeyError(f"train.early_stopping.metric={self.metric!r} is not among the periodic eval "
                           f"metrics {sorted(metrics)}")
        value = metrics[self.metric]
        sign = 1.0 if self.mode == "min" else -1.0
        if self.best is None or sign * (self.best - value) > self.min_delta:
            self.best, self.best_step, self.bad_evals = value, step, 0
            return True
        self.bad_evals += 1
        return False

    def state(self) -> dict:
        return {k: getattr(self, k) for k in ("best", "best_step", "bad_evals", "stopped")}

    def load(self, state: dict | None) -> None:
        for k, v in (state or {}).items():
            setattr(self, k, v)


def cross_validate(experiment: types.ModuleType, config: ml_collections.ConfigDict, workdir: str,
                   devices=None) -> dict:
    """k trainings (workdir/fold_<i>), each validated on its fold; returns and writes
    `kfold.json` with every `val/` metric's per-fold values, mean and std."""
    from jaxml.train import loop  # loop imports this module

    k = config.eval.kfold
    per_fold: list[dict] = []
    for i, (train_split, validation_split) in enumerate(kfold_splits(config.data, k)):
        fold = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy; the user's stays as it is
        fold.eval.kfold = 0
        fold.data.train_split, fold.data.validation_split = train_split, validation_split
        fold.data.validation_fraction = 0.0
        log.info(f"fold {i + 1}/{k}: train {train_split}, validation {validation_split}")
        result = loop.train(experiment, fold, os.path.join(workdir, f"fold_{i}"), devices=devices)
        per_fold.append({m: v for m, v in result.eval_metrics.items() if m.startswith("val/")})
    summary = {m: {"folds": [f[m] for f in per_fold], "mean": float(np.mean([f[m] for f in per_fold])),
                   "std": float(np.std([f[m] for f in per_fold]))} for m in per_fold[0]}
    log.info(f"{k}-fold cross-validation: " + "  ".join(
        f"{m} {s['mean']:.4f} ± {s['std']:.4f}" for m, s in summary.items()))
    with open(os.path.join(workdir, "kfold.json"), "w") as f:
        json.dump({"k": k, "metrics": summary}, f, indent=2)
    return summary

