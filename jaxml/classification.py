"""The supervised-classification step, eval sums and report shared by the classifier experiments.

An experiment (cnn, mlp, resnet, vit) keeps what is its own: the model, how images become
inputs (augmentation, resizing), the config. The cross-entropy step (with BatchNorm
statistics and an EMA when the state has them), the summed eval metrics and the
confusion-matrix report are the same for all of them, so they live here once.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxml import data, losses, metrics, plots
from jaxml.train import log, optim, parallel
from jaxml.train.state import TrainState


def _variables(state: TrainState, params) -> dict:
    return {"params": params, **({"batch_stats": state.batch_stats} if state.batch_stats is not None else {})}


def init(config: ml_collections.ConfigDict, model: nn.Module, inputs, rng) -> TrainState:
    """Params (and BatchNorm statistics, EMA) of `model` for example `inputs`, with the config's optimizer."""
    _check_classes(config, model)
    variables = model.init({"params": rng}, inputs, train=False)  # config.init_from: the loop loads after
    tx = optim.make_optimizer(config.optim, config.train.steps)
    return TrainState.create(variables["params"], tx, ema_decay=config.optim.ema_decay,
                             batch_stats=variables.get("batch_stats"))


def _check_classes(config, model: nn.Module) -> None:
    """A head narrower than the dataset's labels would give NaN losses (cross-entropy of an index
    past the logits) at the first step: refuse before compiling, saying both numbers."""
    classes = getattr(model, "num_classes", None)
    if classes is None or "data" not in config:
        return
    info = data.dataset_info(config.data.name, data_dir=config.data.get("data_dir"))
    if info.num_classes is not None and info.num_classes > classes:
        raise ValueError(f"model.num_classes={classes} but dataset {config.data.name!r} has {info.num_classes} "
                         f"classes (labels 0..{info.num_classes - 1}): set model.num_classes={info.num_classes}, "
                         f"or train on a subset whose labels are renumbered below {classes}")


def train_step(config: ml_collections.ConfigDict, state: TrainState, model: nn.Module, inputs, labels_B,
               dropout_rng) -> tuple[TrainState, dict]:
    """One cross-entropy step of `model` on prepared `inputs`; BatchNorm statistics update when kept."""
    has_bn = state.batch_stats is not None

    def loss_fn(params):
        logits, updates = model.apply(_variables(state, params), inputs, train=True, rngs={"dropout": dropout_rng},
                                      mutable=["batch_stats"] if has_bn else [])
        return losses.cross_entropy(logits, labels_B).mean(), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = parallel.mean_over_devices(grads)
    tx = optim.make_optimizer(config.optim, config.train.steps)
    new_state = state.apply_gradients(grads, tx, ema_decay=config.optim.ema_decay,
                                      batch_stats=updates.get("batch_stats", state.batch_stats))
    return new_state, {
        "loss": loss,
        "accuracy": metrics.correct(logits, labels_B).mean(),
        "grad_norm": optax.tree.norm(grads),
        "lr": optim.make_schedule(config.optim, config.train.steps)(state.step),
    }


def eval_step(state: TrainState, model: nn.Module, inputs, labels_B, mask_B, num_classes: int,
              top_k: int = 0) -> dict:
    """Sums over the real examples: loss, accuracy, top-k accuracy (k > 0), count, confusion matrix.

    Evaluates the EMA of the params when the state keeps one, and BatchNorm's running
    statistics (so padding rows move nothing)."""
    params = state.ema_params if state.ema_params is not None else state.params
    logits = model.apply(_variables(state, params), inputs, train=False)
    sums = {
        "loss": (losses.cross_entropy(logits, labels_B) * mask_B).sum(),
        "accuracy": (metrics.correct(logits, labels_B) * mask_B).sum(),
        "count": mask_B.sum(),
        "confusion": metrics.confusion_matrix(jnp.argmax(logits, -1), labels_B, num_classes, mask_B),
    }
    if top_k:
        sums[f"top{top_k}_accuracy"] = (metrics.top_k_correct(logits, labels_B, top_k) * mask_B).sum()
    return sums


def eval_metrics(config: ml_collections.ConfigDict, eval_sums: dict) -> dict[str, float]:
    """Macro precision / recall / F1 from a split's summed confusion matrix (the loop logs them per eval)."""
    del config
    prf = metrics.precision_recall_f1(eval_sums["confusion"])
    return {k: float(prf[k]) for k in ("precision", "recall", "f1")}


def report(workdir: str, eval_sums: dict | None, title: str) -> None:
    """Prints accuracy and macro precision / recall / F1; writes confusion_matrix.png."""
    if eval_sums is None:
        return
    acc = float(eval_sums["accuracy"]) / float(eval_sums["count"])
    prf = eval_metrics(None, eval_sums)
    log.info(f"{title}: accuracy {acc:.4f}  macro precision {prf['precision']:.4f}  "
             f"recall {prf['recall']:.4f}  F1 {prf['f1']:.4f}")
    plots.confusion_matrix(os.path.join(workdir, "confusion_matrix.png"), eval_sums["confusion"],
                           title=f"{title}: accuracy {acc:.2%}")
