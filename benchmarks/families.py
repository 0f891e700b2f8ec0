"""The benchmarked workloads: one per model family, at fixed, documented sizes.

Each workload is an experiment's own `init` / `train_step` (what `python -m experiments.x`
trains) with its default config, at the sizes in `SIZES`, on one cached batch. CPU sizes
are the experiments' defaults (shared/BASELINES.md's CNN and char GPT); ResNet-50 runs at a
small batch and resolution on CPU (batch 8, 64x64) and at ImageNet size on GPU. The GPU sizes
are the issue's targets (GPT-2 small, 124M, in bfloat16). `quick` sizes are tiny, for smoke runs.

`bare_step` is the hand-written alternative a user would write without jaxml: `jax.jit` of
value_and_grad + the same optax optimizer on the same model and batch, no engine.
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from benchmarks.measure import flops_of
from experiments import cnn, diffusion, gpt, lstm, resnet, vit
from jaxml import classification, data, losses
from jaxml.data import text
from jaxml.models import resnet as resnet_models
from jaxml.models import vit as vit_models
from jaxml.train import optim

FAMILIES = ("cnn", "resnet20", "resnet50", "vit", "lstm", "gpt", "unet")


@dataclasses.dataclass
class Workload:
    name: str
    size: str  # the documented size, one line
    experiment: Any  # has init(config, rng, batch) and train_step(config, state, batch, rng)
    config: ml_collections.ConfigDict
    batch: dict  # one host batch (numpy)
    unit: str  # what throughput counts: images or tokens
    items_per_step: int
    kind: str  # classifier | lm | diffusion: which bare step and PyTorch twin apply
    dtype: str
    flops: Callable[[], tuple[float, str]] | None = None  # None: the compiled step's own count


class _ResNet50:
    """ResNet-50 through the classifier step every jaxml classifier uses (experiments.resnet
    has only the CIFAR depths): init / train_step with the experiment's augmentation."""

    @staticmethod
    def model(config):
        return resnet_models.ResNet50(num_classes=config.model.num_classes,
                                      dtype=jnp.dtype(config.model.dtype))

    @staticmethod
    def init(config, rng, batch):
        return classification.init(config, _ResNet50.model(config), _unit_images(batch), rng)

    @staticmethod
    def train_step(config, state, batch, rng):
        aug_rng, dropout_rng = jax.random.split(rng)
        images = data.augment(aug_rng, _unit_images(batch), crop_padding=config.data.augment.crop_padding,
                              flip=config.data.augment.flip)
        return classification.train_step(config, state, _ResNet50.model(config), images, batch["label"],
                                         dropout_rng)


def _unit_images(batch):
    return batch["image"].astype(jnp.float32) / 255.0


def _images(rng, batch, size, channels):
    return {"image": rng.integers(0, 256, (batch, size, size, channels), dtype=np.uint8),
            "label": rng.integers(0, 10, (batch,)).astype(np.int32)}


def _tokens(rng, batch, length, vocab):
    return {"tokens": rng.integers(0, vocab, (batch, length + 1), dtype=np.int32)}


def workload(name: str, device: str = "cpu", quick: bool = False, dtype: str | None = None) -> Workload:
    """The workload `name` (one of FAMILIES) at its documented size for `device` (cpu | gpu)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; expected one of {FAMILIES}")
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    dtype = dtype or ("bfloat16" if device == "gpu" else "float32")
    gpu = device == "gpu"
    rng = np.random.default_rng(0)
    flops = None
    if name == "cnn":
        c = cnn.get_config("tiny" if quick else None)
        c.data.batch_size = 16 if quick else 128
        c.model.dtype = dtype
        batch = _images(rng, c.data.batch_size, 8, 1)
        size = "LeNet conv3x3(32)-conv3x3(64)-pool-dense128, 8x8x1 digits" + (" (tiny)" if quick else "")
        exp, kind, unit = cnn, "classifier", "images"
    elif name == "resnet20":
        c = resnet.get_config("tiny" if quick else None)
        c.model.image_size = 16 if quick else 32
        c.data.batch_size = 16 if quick else (128 if gpu else 64)
        c.model.dtype = dtype
        batch = _images(rng, c.data.batch_size, c.model.image_size, 3)
        size = f"ResNet-20 (0.27M), {c.model.image_size}x{c.model.image_size}x3, SGD-Nesterov, BatchNorm"
        exp, kind, unit = resnet, "classifier", "images"
    elif name == "resnet50":
        c = resnet.get_config()
        c.model.variant = "resnet50"
        side = 32 if quick else (224 if gpu else 64)
        c.model.image_size = side
        c.data.batch_size = 2 if quick else (64 if gpu else 8)
        c.model.dtype = dtype
        c.data.augment.crop_padding = side // 8
        batch = _images(rng, c.data.batch_size, side, 3)
        size = f"ResNet-50 (23.5M, 10 classes), {side}x{side}x3" + ("" if gpu else " (CPU: small batch/resolution)")
        exp, kind, unit = _ResNet50, "classifier", "images"
    elif name == "vit":
        c = vit.get_config("tiny" if quick else None)
        c.data.batch_size = 16 if quick else 128
        c.model.dtype = dtype
        # Inputs come at image_size already (the digits run upsamples 8x8 on device; here it is a no-op).
        batch = _images(rng, c.data.batch_size, c.model.image_size, 1)
        m = c.model
        size = f"ViT {m.num_layers}L w{m.features} {m.num_heads}h mlp{m.mlp_dim}, {m.image_size}x{m.image_size}x1, patch {m.patch_size}"
        exp, kind, unit = vit, "classifier", "images"
        flops = functools.partial(_vit_unrolled_flops, c, batch)
    elif name == "lstm":
        c = lstm.get_config("tiny" if quick else None)
        c.model.dtype = dtype
        batch = _tokens(rng, c.data.batch_size, 64, text.VOCAB_SIZE)
        m = c.model
        size = f"char LSTM {m.num_layers}x{m.hidden} embed {m.embed}, context 64, vocab 256"
        exp, kind, unit = lstm, "lm", "tokens"
        flops = functools.partial(_lstm_flops, c, batch)
    elif name == "gpt":
        c = gpt.get_config("tiny" if quick else None)
        if gpu and not quick:  # GPT-2 small: 124M params, context 1024, fused attention
            c.model.update(dict(vocab_size=50304, num_layers=12, features=768, num_heads=12, mlp_dim=3072,
                                max_len=1024, use_fused=True))
            c.data.batch_size = 8
        c.model.dtype = dtype
        batch = _tokens(rng, c.data.batch_size, c.model.max_len, c.model.vocab_size)
        m = c.model
        size = f"GPT {m.num_layers}L w{m.features} {m.num_heads}h, context {m.max_len}, vocab {m.vocab_size}"
        exp, kind, unit = gpt, "lm", "tokens"
        flops = functools.partial(_gpt_flops, c, batch)
    else:  # unet
        c = diffusion.get_config("tiny" if quick else None)
        if gpu and not quick:
            c.model.update(dict(image_size=32, channels=128, channel_mults=(1, 2, 2), attention_resolutions=(8,)))
            c.data.batch_size = 128
        c.model.dtype = dtype
        side = c.model.image_size
        batch = _images(rng, c.data.batch_size, side, 1)
        m = c.model
        size = f"DDPM U-Net ch{m.channels} x{tuple(m.channel_mults)}, attention at {tuple(m.attention_resolutions)}, {side}x{side}x1, EMA"
        exp, kind, unit = diffusion, "diffusion", "images"
    items = c.data.batch_size * (batch["tokens"].shape[1] - 1 if unit == "tokens" else 1)
    return Workload(name=name, size=f"{size}; batch {c.data.batch_size}", experiment=exp, config=c, batch=batch,
                    unit=unit, items_per_step=items, kind=kind, dtype=dtype, flops=flops)


# ---- FLOP counts where XLA's would miss loop trips -------------------------------------


def _gpt_flops(config, batch) -> tuple[float, str]:
    return gpt.flops_per_step(config, jax.tree.map(jnp.asarray, batch)), "XLA cost analysis, unrolled layers"


def _vit_unrolled_flops(config, batch) -> tuple[float, str]:
    m = config.model
    model = vit_models.ViT(num_classes=m.num_classes, patch_size=m.patch_size, num_layers=m.num_layers,
                           features=m.features, num_heads=m.num_heads, mlp_dim=m.mlp_dim, dropout=m.dropout,
                           pool=m.pool, scan_layers=False, dtype=jnp.dtype(m.dtype))
    state, step = bare_step("classifier", model, config, batch, abstract=True)
    lowered = step.lower(state, jax.tree.map(jnp.asarray, batch), jax.random.key(0))
    return flops_of(lowered), "XLA cost analysis, unrolled layers"


def _lstm_flops(config, batch) -> tuple[float, str]:
    """Matmul FLOPs x 3 (forward + two backward matmuls): nn.RNN scans over time and XLA counts a loop body once."""
    m = config.model
    b, t = batch["tokens"].shape[0], batch["tokens"].shape[1] - 1
    forward, width = 0, m.embed
    for _ in range(m.num_layers):
        forward += 2 * b * t * (width + m.hidden) * 4 * m.hidden
        width = m.hidden
    forward += 2 * b * t * m.hidden * text.VOCAB_SIZE
    return 3.0 * forward, "analytic: 3 x matmul FLOPs"


# ---- the bare hand-written step --------------------------------------------------------


def model_of(w: Workload):
    return w.experiment.model(w.config)


def bare_step(kind: str, model, config, host_batch, abstract: bool = False):
    """(state, jitted step) written by hand: value_and_grad + the config's optax optimizer;
    step(state, batch, key) -> (state, loss). `abstract`: the state as shapes only."""
    tx = optim.make_optimizer(config.optim, config.train.steps)
    key = jax.random.key(0)
    batch = jax.tree.map(jnp.asarray, host_batch)
    if kind == "classifier":
        def init(rng):
            variables = model.init({"params": rng}, _unit_images(batch), train=False)
            return variables["params"], tx.init(variables["params"]), variables.get("batch_stats", {}), jnp.int32(0)

        def step(state, batch, key):
            params, opt_state, stats, count = state
            aug_rng, drop_rng = jax.random.split(jax.random.fold_in(key, count))
            x = data.augment(aug_rng, _unit_images(batch), crop_padding=config.data.augment.crop_padding,
                             flip=config.data.augment.flip)

            def loss_fn(p):
                logits, updates = model.apply({"params": p, **({"batch_stats": stats} if stats else {})}, x,
                                              train=True, rngs={"dropout": drop_rng},
                                              mutable=["batch_stats"] if stats else [])
                return losses.cross_entropy(logits, batch["label"]).mean(), updates

            (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates_tx, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates_tx), opt_state, updates.get("batch_stats", stats),
                    count + 1), loss
    elif kind == "lm":
        def init(rng):
            params = model.init({"params": rng}, batch["tokens"][:, :-1].astype(jnp.int32))["params"]
            return params, tx.init(params), jnp.int32(0)

        def step(state, batch, key):
            params, opt_state, count = state
            tokens = batch["tokens"].astype(jnp.int32)

            def loss_fn(p):
                logits = model.apply({"params": p}, tokens[:, :-1], train=True,
                                     rngs={"dropout": jax.random.fold_in(key, count)})
                return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, count + 1), loss
    else:
        raise ValueError(f"no bare step for kind {kind!r}; expected 'classifier' or 'lm'")
    state = jax.eval_shape(init, key) if abstract else jax.jit(init)(key)
    return state, jax.jit(step, donate_argnums=(0,))

