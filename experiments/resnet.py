"""ResNet-20 (He et al. 2016) image classifier: handwritten digits upsampled to 32x32 (offline) or CIFAR-10.

    python -m experiments.resnet                                         # offline digits, ~1 min on 2 CPU cores
    python -m experiments.resnet --config=experiments/resnet.py:cifar10  # the paper's CIFAR-10 schedule (TFDS)

The digits' 8x8 images are resized to 32x32 on the device inside the step
(`jax.image.resize`), so the host pipeline stays a gather of stored bytes. Training:
random crops with 4 pixels of padding (and left-right flips for CIFAR-10 only: flipped
digits are other glyphs), SGD with Nesterov momentum 0.9, linear warmup then cosine decay,
L2 weight decay 1e-4 off biases and BatchNorm.

Reference: ResNet-20 (0.27 M parameters) reaches 91.25% test accuracy on CIFAR-10
(8.75% error; He et al. 2016, "Deep Residual Learning for Image Recognition", Table 6),
with 64k iterations at batch 128 -- hours on a GPU, far beyond a CPU; the `cifar10` preset
follows that schedule. Expected offline (digits, 100 steps of batch 48, 2 CPU cores):
95.6% test accuracy, ~63 s of CPU time (3 min wall on a machine shared three ways; 150 steps
of 64 give 97.3%). ResNet-20 trains at ~70-90 images/s on 2 CPU cores.
Writes confusion_matrix.png.
"""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxml import classification
from jaxml import config as config_lib
from jaxml import data, transfer
from jaxml.models import resnet
from jaxml.train.state import TrainState

VARIANTS = ("resnet20", "resnet32", "resnet56", "tiny")


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Defaults for the offline digits run; presets: tiny (tests), cifar10 (the paper's schedule)."""
    c = config_lib.base_config()
    c.model = ml_collections.ConfigDict(dict(
        variant="resnet20",  # resnet20 | resnet32 | resnet56 | tiny
        num_classes=10,
        image_size=32,  # inputs are resized to this on the device (a no-op for CIFAR's 32x32)
        dtype="float32",  # "bfloat16" for mixed precision on TPU/GPU
    ))
    c.optim.name = "nesterov"
    c.optim.momentum = 0.9
    c.optim.lr = 0.1  # the paper's 0.1 at batch 128; linear scaling gives 0.05 at 64
    c.optim.schedule = "warmup_cosine"
    c.optim.weight_decay = 1e-4  # L2, as the paper (0.0001)
    # CPU budget (~1 minute on 2 cores at ~70-90 images/s): 100 steps of 48 = 3.2 epochs of the
    # 1500 digits. 150 steps of 64 reach 97.3% in twice the time.
    c.data.batch_size = 48
    c.optim.lr = 0.05
    c.optim.warmup_steps = 10
    c.train.steps = 100
    c.train.log_every = 10
    c.train.eval_every = 0  # only at the end: an eval pass costs ~5 steps of CPU time here
    c.checkpoint.every_steps = 50
    c.data.augment.crop_padding = 4  # in 32x32 pixels: one pixel of the 8x8 digit
    transfer.add_config(c)  # --config.init_from=<workdir> (+ init_reinit for a new head)
    if preset is None or preset == "":
        return c
    if preset == "tiny":  # seconds on CPU, for tests
        c.model.variant, c.model.image_size = "tiny", 16
        c.train.steps, c.train.log_every, c.train.eval_every = 8, 2, 4
        c.checkpoint.every_steps = 4
        c.optim.warmup_steps = 2
        c.data.batch_size = 32
        c.data.eval_batch_size = 64
        c.data.augment.crop_padding = 2
    elif preset == "cifar10":
        c.data.name = "cifar10"
        c.data.batch_size = 128
        c.optim.lr = 0.1
        c.train.steps = 64_000  # the paper: 64k iterations (~164 epochs of 50k images at batch 128)
        c.optim.warmup_steps = 400  # ~1 epoch; the paper warms ResNet-110 only, it costs nothing here
        c.train.log_every = 100
        c.train.eval_every = 4000
        c.checkpoint.every_steps = 4000
        c.data.augment.flip = True
    else:
        raise ValueError(f"unknown preset {preset!r}; presets: tiny, cifar10")
    return c


def model(config) -> nn.Module:
    m, dtype = config.model, config_lib.dtype(config.model.dtype)
    if m.variant == "resnet20":
        return resnet.ResNet20(num_classes=m.num_classes, dtype=dtype)
    elif m.variant == "resnet32":
        return resnet.ResNet32(num_classes=m.num_classes, dtype=dtype)
    elif m.variant == "resnet56":
        return resnet.ResNet56(num_classes=m.num_classes, dtype=dtype)
    elif m.variant == "tiny":
        return resnet.Tiny(num_classes=m.num_classes, dtype=dtype)
    raise ValueError(f"config.model.variant must be one of {VARIANTS}, got {m.variant!r}")


def _inputs(config, batch) -> jax.Array:
    """Images as float32 in [0, 1], resized on the device to image_size x image_size."""
    images_BxHxWxC = batch["image"].astype(jnp.float32) / 255.0
    b, h, w, c = images_BxHxWxC.shape
    size = config.model.image_size
    if (h, w) == (size, size):
        return images_BxHxWxC
    return jax.image.resize(images_BxHxWxC, (b, size, size, c), method="bilinear")


def init(config, rng, batch) -> TrainState:
    return classification.init(config, model(config), _inputs(config, batch), rng)


def train_step(config, state: TrainState, batch, rng):
    aug_rng, dropout_rng = jax.random.split(rng)
    images = data.augment(aug_rng, _inputs(config, batch), crop_padding=config.data.augment.crop_padding,
                          flip=config.data.augment.flip)
    return classification.train_step(config, state, model(config), images, batch["label"], dropout_rng)


def eval_step(config, state: TrainState, batch):
    return classification.eval_step(state, model(config), _inputs(config, batch), batch["label"], batch["mask"],
                                    config.model.num_classes, top_k=5)


eval_metrics = classification.eval_metrics  # macro precision / recall / F1 logged with every eval


def report(config, state, workdir, eval_sums) -> None:
    """Prints precision / recall / F1 and writes confusion_matrix.png for the final test eval."""
    classification.report(workdir, eval_sums, f"{config.model.variant}, {config.data.name} {config.data.eval_split}")


if __name__ == "__main__":
    from jaxml import cli

    cli.main(sys.modules[__name__])
