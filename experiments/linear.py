"""Linear regression on scikit-learn's diabetes data, logistic regression on its breast-cancer data.

    python -m experiments.linear                                         # diabetes, regression
    python -m experiments.linear --config=experiments/linear.py:breast_cancer

Both datasets ship with scikit-learn (jaxml's offline TFDS builders, seeded 80/20 splits).
Features (and the diabetes target) are standardised with statistics of the train split
only, kept in `state.extra` so checkpoints carry them. The report prints scikit-learn's
own `LinearRegression` / `LogisticRegression` on the same split side by side; jaxml should
be within 0.01 R^2 / 1 point of accuracy of it.

Expected (2 CPU cores, ~12 s each, 1500 steps): diabetes test R^2 0.330, MSE 3407 (sklearn's
OLS on the same split: 0.330, 3407); breast_cancer test accuracy 96.49%, binned ROC AUC 0.993
(sklearn: 96.49%, exact AUC 0.993).
Writes predicted_vs_true.png (diabetes) or roc_pr.png (breast_cancer).
"""

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxml import config as config_lib
from jaxml import data, metrics, plots
from jaxml.models import linear
from jaxml.train import log, optim, parallel
from jaxml.train.state import TrainState

TASKS = ("regression", "binary")


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Defaults for diabetes regression; presets: breast_cancer, tiny and tiny_breast_cancer (tests)."""
    c = config_lib.base_config()
    c.model = ml_collections.ConfigDict(dict(
        task="regression",  # regression: LinearRegression + squared error; binary: LogisticRegression
        num_thresholds=200,  # binary: score thresholds of the binned ROC / precision-recall curves
    ))
    c.data.name = "diabetes"
    c.data.batch_size = 128  # a third of the 354 training rows: cheap steps, little noise
    c.optim.name = "adam"
    c.optim.lr = 0.05
    c.optim.schedule = "warmup_cosine"  # decaying to 0 removes the minibatch noise at the end
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.0  # ordinary least squares, as sklearn's LinearRegression
    c.train.steps = 1500
    c.train.log_every = 100
    c.train.eval_every = 500
    c.checkpoint.every_steps = 500
    if preset in ("breast_cancer", "tiny_breast_cancer"):
        c.model.task = "binary"
        c.data.name = "breast_cancer"
        # sklearn's LogisticRegression minimises 1/2 |w|^2 + C * sum(losses) with C = 1; per example
        # that is an L2 of 1 / (C * n_train) = 1 / 455 on the weights (not the bias, as here).
        c.optim.weight_decay = 1.0 / 455
    if preset is None or preset in ("", "breast_cancer"):
        return c
    if preset in ("tiny", "tiny_breast_cancer"):  # seconds on CPU, for tests
        c.train.steps, c.train.log_every, c.train.eval_every = 12, 2, 6
        c.checkpoint.every_steps = 4
        c.optim.warmup_steps = 2
        c.data.batch_size = 32
        c.data.eval_batch_size = 64  # 88 / 114 test rows: the last eval batch is padded
    else:
        raise ValueError(f"unknown preset {preset!r}; presets: breast_cancer, tiny, tiny_breast_cancer")
    return c


def model(config) -> nn.Module:
    if config.model.task == "regression":
        return linear.LinearRegression(num_targets=1)
    elif config.model.task == "binary":
        return linear.LogisticRegression()
    raise ValueError(f"config.model.task must be one of {TASKS}, got {config.model.task!r}")


def standardisation(config) -> dict[str, np.ndarray]:
    """Mean and std of the train split's features (and regression target), computed on the host."""
    source = data.load_source(config.data.name, config.data.train_split, config.data.data_dir, cache=True)
    features_NxD = np.asarray(source.arrays["features"], np.float64)
    std_D = features_NxD.std(0)
    stats = {"feature_mean": features_NxD.mean(0), "feature_std": np.where(std_D > 0, std_D, 1.0)}
    if config.model.task == "regression":
        # The target too: Adam then starts at the right scale; OLS is unchanged by an affine target map.
        target_N = np.asarray(source.arrays["target"], np.float64)
        stats.update(target_mean=target_N.mean(), target_std=target_N.std())
    return {k: np.asarray(v, np.float32) for k, v in stats.items()}


def _inputs(state: TrainState, batch) -> jax.Array:
    return (batch["features"] - state.extra["feature_mean"]) / state.extra["feature_std"]


def _predict(config, state: TrainState, batch) -> jax.Array:
    """Regression: targets in the data's units; binary: the logit of P(label = 1)."""
    out = model(config).apply({"params": state.params}, _inputs(state, batch))
    if config.model.task == "regression":
        return out[:, 0] * state.extra["target_std"] + state.extra["target_mean"]
    return out


def init(config, rng, batch) -> TrainState:
    # Runs under eval_shape / jit: the statistics are host numpy arrays, so they enter as constants.
    extra = {k: jnp.asarray(v) for k, v in standardisation(config).items()}
    x_BxD = (batch["features"] - extra["feature_mean"]) / extra["feature_std"]
    params = model(config).init({"params": rng}, x_BxD)["params"]
    tx = optim.make_optimizer(config.optim, config.train.steps)
    return TrainState.create(params, tx, extra=extra)


def _loss(config, state: TrainState, params, batch) -> tuple[jax.Array, jax.Array]:
    """(mean loss, per-example output) for `params`."""
    out = model(config).apply({"params": params}, _inputs(state, batch))
    if config.model.task == "regression":
        target_B = (batch["target"] - state.extra["target_mean"]) / state.extra["target_std"]
        return ((out[:, 0] - target_B) ** 2).mean(), out
    return optax.sigmoid_binary_cross_entropy(out, batch["label"].astype(jnp.float32)).mean(), out


def train_step(config, state: TrainState, batch, rng):
    del rng  # a linear model on fixed features has nothing random in its step
    (loss, out), grads = jax.value_and_grad(lambda p: _loss(config, state, p, batch), has_aux=True)(state.params)
    grads = parallel.mean_over_devices(grads)
    tx = optim.make_optimizer(config.optim, config.train.steps)
    step_metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                    "lr": optim.make_schedule(config.optim, config.train.steps)(state.step)}
    if config.model.task == "binary":
        step_metrics["accuracy"] = ((out >= 0) == (batch["label"] == 1)).astype(jnp.float32).mean()
    return state.apply_gradients(grads, tx), step_metrics


def eval_step(config, state: TrainState, batch):
    mask_B = batch["mask"]
    out = _predict(config, state, batch)
    if config.model.task == "regression":
        return {**metrics.regression_sums(out, batch["target"], mask_B), "count": mask_B.sum()}
    labels_B = batch["label"]
    loss_B = optax.sigmoid_binary_cross_entropy(out, labels_B.astype(jnp.float32))
    return {
        "loss": (loss_B * mask_B).sum(),
        "accuracy": (((out >= 0) == (labels_B == 1)) * mask_B).sum(),
        "count": mask_B.sum(),
        "confusion": metrics.confusion_matrix((out >= 0).astype(jnp.int32), labels_B, 2, mask_B),
        **metrics.binary_threshold_counts(jax.nn.sigmoid(out), labels_B, mask_B, config.model.num_thresholds),
    }


def eval_metrics(config, eval_sums) -> dict[str, float]:
    """The split's metrics from the summed eval arrays: MSE / MAE / R^2, or accuracy / P / R / F1 / AUC."""
    count = float(eval_sums["count"])
    if config.model.task == "regression":
        return metrics.regression_metrics(eval_sums, count)
    prf = metrics.precision_recall_f1(eval_sums["confusion"])
    counts = [eval_sums[k] for k in ("tp", "fp", "tn", "fn")]
    return {
        "accuracy": float(eval_sums["accuracy"]) / count,
        # Label 1 (benign) is the positive class, as sklearn's binary precision/recall/F1 default.
        "precision": float(prf["precision_per_class"][1]),
        "recall": float(prf["recall_per_class"][1]),
        "f1": float(prf["f1_per_class"][1]),
        "f1_macro": float(prf["f1"]),
        "roc_auc": metrics.roc_auc(*counts),
        "average_precision": metrics.average_precision(*counts),
    }


def sklearn_baseline(config) -> dict[str, float]:
    """scikit-learn's own model fitted on the same train split (standardised on it), scored on the eval split."""
    from sklearn import linear_model, metrics as sk_metrics, preprocessing

    dc = config.data
    train = data.load_source(dc.name, dc.train_split, dc.data_dir, cache=True).arrays
    test = data.load_source(dc.name, dc.eval_split, dc.data_dir, cache=True).arrays
    scaler = preprocessing.StandardScaler().fit(train["features"])
    x_train, x_test = scaler.transform(train["features"]), scaler.transform(test["features"])
    if config.model.task == "regression":
        predicted = linear_model.LinearRegression().fit(x_train, train["target"]).predict(x_test)
        return {"mse": float(sk_metrics.mean_squared_error(test["target"], predicted)),
                "r2": float(sk_metrics.r2_score(test["target"], predicted))}
    clf = linear_model.LogisticRegression(max_iter=5000).fit(x_train, train["label"])
    return {"accuracy": float(clf.score(x_test, test["label"])),
            "roc_auc": float(sk_metrics.roc_auc_score(test["label"], clf.predict_proba(x_test)[:, 1]))}


def report(config, state, workdir, eval_sums) -> None:
    """Prints jaxml's and scikit-learn's test metrics side by side, logs them, and writes the PNG."""
    if eval_sums is None:
        return
    ours, theirs = eval_metrics(config, eval_sums), sklearn_baseline(config)
    log.info(f"{config.data.name} {config.data.eval_split}: " + "  ".join(f"{k} {v:.4f}" for k, v in ours.items()))
    log.info("  vs scikit-learn: " + "  ".join(f"{k} {ours[k]:.4f} (sklearn {v:.4f})" for k, v in theirs.items()))
    step = int(state.step)
    writer = log.MetricWriter(workdir)
    writer.write(step, {**{f"final/{k}": v for k, v in ours.items()}, **{f"sklearn/{k}": v for k, v in theirs.items()}})
    writer.close()
    if config.model.task == "regression":
        test = data.load_source(config.data.name, config.data.eval_split, config.data.data_dir, cache=True).arrays
        predicted_N = np.asarray(_predict(config, state, test))
        plots.predicted_vs_true(os.path.join(workdir, "predicted_vs_true.png"), test["target"], predicted_N,
                                title=f"{config.data.name} {config.data.eval_split}: R² {ours['r2']:.3f} "
                                      f"(sklearn {theirs['r2']:.3f})")
        return
    counts = [eval_sums[k] for k in ("tp", "fp", "tn", "fn")]
    fpr, tpr = metrics.roc_curve(*counts)
    precision, recall = metrics.precision_recall_curve(*counts)
    plots.roc_and_precision_recall(
        os.path.join(workdir, "roc_pr.png"), fpr, tpr, precision, recall, ours["roc_auc"],
        title=f"{config.data.name} {config.data.eval_split}: accuracy {ours['accuracy']:.2%} "
              f"(sklearn {theirs['accuracy']:.2%})")


if __name__ == "__main__":
    from jaxml import cli

    cli.main(sys.modules[__name__])
