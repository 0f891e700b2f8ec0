"""Char-level LSTM (GRU by config) LM on the stdlib source, and an RNN sequence classifier (preset `classify`).

    python -m experiments.lstm                                       # next-byte LM, offline
    python -m experiments.lstm --config.model.cell=gru
    python -m experiments.lstm --config=experiments/lstm.py:classify # which stdlib package a 128-byte window is from
    python -m experiments.lstm --config=experiments/lstm.py:imdb     # TFDS imdb_reviews sentiment (needs the data)

The LM reports validation loss in nats/char (eval/loss) and bits/char (eval/bits_per_char)
and writes samples.txt; the classifier reports accuracy over 7 packages (chance 1/7).
Measured on 2 CPU cores (2026-12-06, jax 0.10.2): the LM reaches 1.446 nats/char (2.09
bits/char) on the validation files after 1000 steps (1.559 at 500), 180 s of CPU time (104 s of
wall time on an idle machine; a 128-wide LSTM is 3.5x cheaper but only reaches 1.85; GRU cells,
`--config.model.cell=gru`, reach 1.340 nats/char, 1.93 bits/char);
`classify` reaches 40.2% accuracy over 7 packages (chance 14.3%) in 31 CPU-seconds.

`imdb` reads `text_windows/imdb_reviews_512`: the first 512 bytes of each review of a prepared
TFDS `imdb_reviews` (zero-padded; the model masks the padding by each review's length). TFDS
needs TensorFlow and internet to prepare imdb_reviews once (`tfds build imdb_reviews
--file_format=array_record`); a byte-level biLSTM of this size is expected to reach roughly
80-85% test accuracy on it (not measured here: no internet on the machines jaxml is tested on).
"""

import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxml import config as config_lib
from jaxml import data, losses, metrics
from jaxml.data import text
from jaxml.models import rnn
from jaxml.train import optim, parallel
from jaxml.train.state import TrainState

LN2 = float(np.log(2.0))


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """LM defaults; presets: tiny (tests), classify, classify_tiny (tests), imdb."""
    c = config_lib.base_config()
    c.model = ml_collections.ConfigDict(dict(
        task="lm",  # lm | classify
        cell="lstm",  # lstm | gru
        embed=64, hidden=256, num_layers=2, bidirectional=False, dropout=0.0, num_classes=len(text.MODULE_CLASSES),
        dtype="float32",
        # The forward time loop's interleaved row blocks (rnn.lstm_scan); None: by backend and size
        # (2 on CPU for batches up to 32 at ~256 hidden units, this LM's default).
        row_blocks=ml_collections.config_dict.placeholder(int),
        # Each layer's consecutive time chunks (rnn.LSTM); None: by backend and size (4 on CPU for
        # batches and sequences of 16 or more, this LM's default).
        time_chunks=ml_collections.config_dict.placeholder(int)))
    c.data.name = "text_windows/pystdlib_64"
    c.data.eval_split = "validation"
    c.data.batch_size = 32
    c.data.eval_batch_size = 256
    c.optim.name = "adamw"
    c.optim.lr = 3e-3
    c.optim.schedule = "warmup_cosine"
    c.optim.warmup_steps = 50
    c.optim.clip_norm = 1.0
    c.train.steps = 1000
    c.train.eval_every = 500
    c.checkpoint.every_steps = 500
    if preset in ("classify", "classify_tiny"):
        c.model.update(dict(task="classify", hidden=64, num_layers=1, bidirectional=True, dropout=0.1))
        c.data.name = "text_windows/pymodules_128"
        c.train.steps = 600
    if preset == "imdb":
        c.model.update(dict(task="classify", hidden=128, num_layers=1, bidirectional=True, dropout=0.2,
                            num_classes=2))
        c.data.name = "text_windows/imdb_reviews_512"
        c.data.eval_split = "test"
        c.data.batch_size = 64
        c.train.steps, c.train.eval_every, c.checkpoint.every_steps = 4000, 1000, 1000
    if preset in ("tiny", "classify_tiny"):  # seconds on CPU, for tests
        c.model.update(dict(embed=8, hidden=16, num_layers=1 if preset == "classify_tiny" else 2))
        c.data.batch_size = 16
        c.data.eval_split = "validation[:32]"
        c.data.eval_batch_size = 32
        c.optim.warmup_steps = 2
        c.train.steps, c.train.log_every, c.train.eval_every = 6, 2, 0
        c.checkpoint.every_steps = 3
    elif preset not in (None, "", "classify", "imdb"):
        raise ValueError(f"unknown preset {preset!r}; presets: tiny, classify, classify_tiny, imdb")
    return c


def model(config):
    m = config.model
    if m.task == "lm":
        return rnn.CharRNNLM(text.VOCAB_SIZE, m.embed, m.hidden, m.num_layers, m.cell, m.dropout,
                             config_lib.dtype(m.dtype), m.row_blocks, m.time_chunks)
    elif m.task == "classify":
        return rnn.RNNClassifier(m.num_classes, text.VOCAB_SIZE, m.embed, m.hidden, m.num_layers, m.bidirectional,
                                 m.cell, m.dropout, config_lib.dtype(m.dtype), m.row_blocks, m.time_chunks)
    raise ValueError(f"model.task must be 'lm' or 'classify', got {m.task!r}")


def _inputs(config, batch) -> tuple:
    """The model's positional inputs: LM (tokens[:-1],); classifier (tokens, lengths or None)."""
    tokens = batch["tokens"].astype(jnp.int32)
    if config.model.task == "lm":
        return (tokens[:, :-1],)
    # Variable-length documents (imdb_reviews) come with their length: the padding is masked.
    return tokens, batch["length"].astype(jnp.int32) if "length" in batch else None


def init(config, rng, batch) -> TrainState:
    params = model(config).init({"params": rng}, *_inputs(config, batch))["params"]
    return TrainState.create(params, optim.make_optimizer(config.optim, config.train.steps))


def _loss(config, logits, batch):
    """Per-example loss: mean over positions (LM) or the class cross-entropy."""
    if config.model.task == "lm":
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:].astype(jnp.int32)).mean(-1)
    return losses.cross_entropy(logits, batch["label"])


def train_step(config, state: TrainState, batch, rng):
    def loss_fn(params):
        logits = model(config).apply({"params": params}, *_inputs(config, batch), train=True, rngs={"dropout": rng})
        return _loss(config, logits, batch).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grads = parallel.mean_over_devices(grads)
    new_state = state.apply_gradients(grads, optim.make_optimizer(config.optim, config.train.steps))
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads),
                       "lr": optim.make_schedule(config.optim, config.train.steps)(state.step)}


def eval_step(config, state: TrainState, batch):
    logits = model(config).apply({"params": state.params}, *_inputs(config, batch))
    mask = batch["mask"]
    loss = (_loss(config, logits, batch) * mask).sum()
    if config.model.task == "lm":
        return {"loss": loss, "bits_per_char": loss / LN2, "count": mask.sum()}
    return {"loss": loss, "accuracy": (metrics.correct(logits, batch["label"]) * mask).sum(), "count": mask.sum()}


def report(config, state, workdir, eval_sums) -> None:
    """LM: samples.txt, 200 bytes sampled (temperature 0.8) after a validation prompt."""
    if config.model.task != "lm":
        return
    prompt = data.load_source(config.data.name, config.data.eval_split, config.data.data_dir, cache=True).arrays["tokens"][0, :16]
    total = len(prompt) + 200
    # One fixed-shape program: the LM is causal, so the padding after position t never changes logit t.
    apply = jax.jit(lambda tokens_1xT, t: model(config).apply({"params": state.params}, tokens_1xT)[0, t])
    tokens, rng = np.zeros((1, total), np.int32), jax.random.key(config.seed)
    tokens[0, :len(prompt)] = prompt
    for t in range(len(prompt), total):
        logits = apply(jnp.asarray(tokens), t - 1)
        tokens[0, t] = int(jax.random.categorical(jax.random.fold_in(rng, t), logits / 0.8))
    tokens = tokens[0]
    with open(os.path.join(workdir, "samples.txt"), "w") as f:
        f.write(text.decode(tokens) + "\n")


if __name__ == "__main__":
    from jaxml import cli

    cli.main(sys.modules[__name__])
