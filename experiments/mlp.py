"""An MLP classifier on flattened images: handwritten digits (offline) or TFDS mnist.

    python -m experiments.mlp                                    # offline digits, 64 pixels in
    python -m experiments.mlp --config=experiments/mlp.py:mnist  # TFDS mnist (prepared, or internet)

Expected (offline digits, 1500 train / 297 test, 2000 steps, batch 128, 2 CPU cores):
test accuracy >= 97%, in well under a minute. Writes confusion_matrix.png.
"""

import sys

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxml import classification
from jaxml import config as config_lib
from jaxml.models import mlp
from jaxml.train.state import TrainState


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Defaults for the offline digits run; presets: tiny (tests), mnist."""
    c = config_lib.base_config()
    c.model = ml_collections.ConfigDict(dict(
        num_classes=10,
        widths=(256, 128),
        activation="relu",  # relu | gelu | silu | tanh | sigmoid
        dropout=0.2,  # 1500 training digits: a 50k-parameter MLP overfits without it
        norm="none",  # none | layer | batch
        init_scheme="he",  # glorot | he | lecun
        dtype="float32",
    ))
    c.optim.name = "adamw"
    c.optim.lr = 1e-3
    c.optim.schedule = "warmup_cosine"
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 1e-4
    c.train.steps = 2000
    c.train.eval_every = 500
    if preset is None or preset == "":
        return c
    if preset == "tiny":  # seconds on CPU, for tests
        c.model.widths, c.model.dropout, c.model.norm = (16,), 0.1, "batch"
        c.train.steps, c.train.log_every, c.train.eval_every = 12, 2, 6
        c.checkpoint.every_steps = 4
        c.optim.warmup_steps = 2
        c.optim.lr = 1e-2
        c.data.batch_size = 32
        c.data.eval_batch_size = 64
    elif preset == "mnist":
        c.data.name = "mnist"
        c.model.widths = (512, 256)
        c.train.steps = 5000
        c.train.eval_every = 1000
        c.checkpoint.every_steps = 1000
    else:
        raise ValueError(f"unknown preset {preset!r}; presets: tiny, mnist")
    return c


def model(config) -> nn.Module:
    m = config.model
    return mlp.MLP(num_outputs=m.num_classes, widths=tuple(m.widths), activation=m.activation, dropout=m.dropout,
                   norm=m.norm, init_scheme=m.init_scheme, dtype=config_lib.dtype(m.dtype))


def _inputs(batch) -> jax.Array:
    return einops.rearrange(batch["image"].astype(jnp.float32) / 255.0, "b h w c -> b (h w c)")


def init(config, rng, batch) -> TrainState:
    return classification.init(config, model(config), _inputs(batch), rng)


def train_step(config, state: TrainState, batch, rng):
    dropout_rng = rng
    images = _inputs(batch)
    return classification.train_step(config, state, model(config), images, batch["label"], dropout_rng)


def eval_step(config, state: TrainState, batch):
    return classification.eval_step(state, model(config), _inputs(batch), batch["label"], batch["mask"],
                                    config.model.num_classes, top_k=3)


eval_metrics = classification.eval_metrics  # macro precision / recall / F1 logged with every eval


def report(config, state, workdir, eval_sums) -> None:
    """Prints precision / recall / F1 and writes confusion_matrix.png for the final test eval."""
    classification.report(workdir, eval_sums, f"MLP, {config.data.name} {config.data.eval_split}")


if __name__ == "__main__":
    from jaxml import cli

    cli.main(sys.modules[__name__])
