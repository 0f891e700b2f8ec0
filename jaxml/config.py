"""The config sections every experiment shares, and checks that run before anything compiles.

An experiment's `get_config()` starts from `base_config()`, adds its `model` section and
overrides defaults; the CLI locks the result so a mistyped key is an error.
"""

import jax
import jax.numpy as jnp
import ml_collections

from jaxml.models import remat
from jaxml.train import optim, parallel

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def data_config() -> ml_collections.ConfigDict:
    """Dataset and input pipeline keys."""
    c = ml_collections.ConfigDict()
    c.name = "digits"  # jaxml's offline builders (digits) or any TFDS name (mnist, cifar10, ...)
    c.data_dir = ml_collections.config_dict.placeholder(str)  # None: TFDS's default data dir
    c.train_split = "train"
    c.eval_split = "test"  # the test split: evaluated at the end (and periodically without validation)
    c.validation_split = ""  # e.g. "validation"; "" = none, or carved by validation_fraction
    c.validation_fraction = 0.0  # > 0: the last fraction of train_split becomes the validation split
    c.batch_size = 128  # the *global* batch; split over data-parallel devices and processes
    c.eval_batch_size = 256
    c.num_workers = 0  # grain worker processes; 0 reads in the main process
    # Read each split into host memory once and gather batches with numpy: decoding records
    # one by one costs more than a small model's step. False for datasets larger than RAM.
    c.cache = True
    c.seed = 0  # shuffle seed, separate from the model seed so either can vary alone
    c.augment = ml_collections.ConfigDict(dict(crop_padding=0, flip=False))
    return c


def base_config() -> ml_collections.ConfigDict:
    """All engine keys with their defaults; experiments add `model` and override the rest."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = data_config()
    c.optim = optim.default_config()
    c.parallel = parallel.default_config()
    c.train = ml_collections.ConfigDict(dict(
        steps=1000,
        log_every=50,
        eval_every=500,  # 0: evaluate only at the end
        # > 0: a step whose loss/metrics or new params are NaN/Inf is discarded (params and
        # optimizer state stay as before it, the batch is consumed) and reported, up to this
        # many times per run; then, or with 0, the run stops naming the step. Costs a select
        # over the state each step (old and new state live at once).
        skip_nonfinite_steps=0,
        # patience > 0: stop after that many periodic evals without improving `metric` by more
        # than min_delta, then restore the best checkpoint (kept in <workdir>/best).
        early_stopping=ml_collections.ConfigDict(dict(metric="val/loss", mode="min", patience=0, min_delta=0.0)),
    ))
    c.eval = ml_collections.ConfigDict(dict(
        kfold=0,  # k >= 2: k-fold cross-validation over data.train_split (workdir/fold_<i>, kfold.json)
    ))
    c.checkpoint = ml_collections.ConfigDict(dict(
        # None: <workdir>/checkpoints. A local path or a URL (gs://bucket/run) that every
        # process of a multi-host run can reach: all of them write their shards there.
        directory=ml_collections.config_dict.placeholder(str),
        every_steps=500,
        every_minutes=0.0,  # > 0: also save when this much wall time has passed since the last save
        max_to_keep=3,
        async_save=True,  # the next steps run while the previous checkpoint is written
        save_retries=0,  # a failed save (full disk, lost mount) is retried this often, then stops the run
        retry_wait_s=1.0,  # seconds before the first retry; doubles each time
        # A step to resume from instead of the newest good checkpoint; when it is missing or
        # unreadable the run refuses to start (no fallback).
        restore_step=ml_collections.config_dict.placeholder(int),
    ))
    c.log = ml_collections.ConfigDict(dict(tensorboard=False, progress=True))
    return c


_TYPED_KEYS = (
    ("seed", int), ("train.steps", int), ("train.log_every", int), ("train.eval_every", int),
    ("train.skip_nonfinite_steps", int), ("checkpoint.every_steps", int), ("checkpoint.every_minutes", float),
    ("checkpoint.save_retries", int), ("checkpoint.retry_wait_s", float), ("checkpoint.async_save", bool),
    ("data.batch_size", int), ("data.eval_batch_size", int), ("data.num_workers", int), ("data.seed", int),
    ("data.validation_fraction", float), ("optim.lr", float),
)


def dtype(name: str):
    """A compute dtype from its config name."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def validate(config: ml_collections.ConfigDict) -> None:
    """Reject values that would only fail later (or silently do the wrong thing)."""
    def need(ok, key, value, expected):
        if not ok:
            raise ValueError(f"config.{key}={value!r} is invalid: expected {expected}")

    # Types first: a string or float where a count belongs would fail deep inside JAX.
    for key, kind in _TYPED_KEYS:
        value = config
        for part in key.split("."):
            value = value[part]
        if kind is bool:
            ok = isinstance(value, bool)
        else:  # bool is an int in Python, but True steps or learning rate is a typo
            ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
        need(ok, key, value, f"a {kind.__name__}, got {type(value).__name__}")

    need(config.train.steps > 0, "train.steps", config.train.steps, "a positive number of steps")
    need(config.train.log_every > 0, "train.log_every", config.train.log_every, "> 0")
    need(config.train.eval_every >= 0, "train.eval_every", config.train.eval_every, ">= 0 (0: only at the end)")
    need(config.train.early_stopping.patience == 0 or config.train.eval_every > 0, "train.eval_every",
         config.train.eval_every, "> 0 when train.early_stopping.patience > 0 (early stopping needs periodic evals)")
    need(config.eval.kfold == 0 or config.eval.kfold >= 2, "eval.kfold", config.eval.kfold, "0 (off) or >= 2")
    need(0.0 <= config.data.validation_fraction < 1.0, "data.validation_fraction", config.data.validation_fraction,
         "in [0, 1)")
    need(config.checkpoint.every_steps > 0, "checkpoint.every_steps", config.checkpoint.every_steps, "> 0")
    need(config.checkpoint.every_minutes >= 0, "checkpoint.every_minutes", config.checkpoint.every_minutes,
         ">= 0 (0: step-based only)")
    need(config.checkpoint.save_retries >= 0, "checkpoint.save_retries", config.checkpoint.save_retries, ">= 0")
    need(config.checkpoint.retry_wait_s >= 0, "checkpoint.retry_wait_s", config.checkpoint.retry_wait_s, ">= 0")
    need(config.checkpoint.restore_step is None or config.checkpoint.restore_step >= 0, "checkpoint.restore_step",
         config.checkpoint.restore_step, "a saved step >= 0, or None (the newest good checkpoint)")
    need(config.train.skip_nonfinite_steps >= 0, "train.skip_nonfinite_steps", config.train.skip_nonfinite_steps,
         ">= 0 (0: stop at the first non-finite step)")
    need(config.checkpoint.max_to_keep is None or config.checkpoint.max_to_keep > 0,
         "checkpoint.max_to_keep", config.checkpoint.max_to_keep, "> 0 or None (keep all)")
    need(config.data.batch_size > 0, "data.batch_size", config.data.batch_size, "> 0")
    need(config.data.eval_batch_size > 0, "data.eval_batch_size", config.data.eval_batch_size, "> 0")
    need(config.data.num_workers >= 0, "data.num_workers", config.data.num_workers, ">= 0")
    need(config.parallel.mode in ("jit", "pmap"), "parallel.mode", config.parallel.mode, "'jit' or 'pmap'")
    if parallel.check_xla_options(config.parallel.get("xla_options", ()), config.parallel.mode):
        parallel.compiler_options(config.parallel, jax.default_backend())  # XLA parses them: one empty program
    if "model" in config and "dtype" in config.model:
        dtype(config.model.dtype)
    if "model" in config and "remat" in config.model:
        remat.check(config.model.remat)  # a policy name: one line before JAX compiles anything
    optim.make_optimizer(config.optim, config.train.steps)  # raises on bad optimizer keys
