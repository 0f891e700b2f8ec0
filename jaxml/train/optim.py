"""Optimizer and learning-rate schedule from `config.optim`; weight-decay and freezing masks.

Every step count in the config (`warmup_steps`, `boundaries`) and `total_steps` counts
train steps, i.e. calls of `train_step`, also when gradients are accumulated.

Param trees may hold flax `nn.Partitioned` / `nn.LogicallyPartitioned` boxes: masks treat
a box as one leaf, so the same mask works on boxed and unboxed trees, and optimizer state
built from boxed params keeps the boxes (and with them the logical axis names).
"""

import math
import numbers
import re

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "nadam", "rmsprop", "adafactor")
SCHEDULES = ("constant", "warmup_cosine", "warmup_linear", "piecewise")

# Flax names these params on biases and on LayerNorm/BatchNorm/RMSNorm.
_NO_DECAY_NAMES = ("bias", "scale")


def default_config() -> ml_collections.ConfigDict:
    """Every `config.optim` key with its default; experiments copy this and override."""
    cfg = ml_collections.ConfigDict()
    cfg.name = "adamw"  # sgd | momentum | nesterov | adam | adamw | nadam | rmsprop | adafactor
    cfg.lr = 1e-3  # peak learning rate
    cfg.momentum = 0.9  # used by `momentum` and `nesterov` only
    cfg.b1 = 0.9  # adam, adamw, nadam
    cfg.b2 = 0.999  # adam, adamw, nadam; also rmsprop's squared-gradient decay
    cfg.eps = 1e-8  # adam family and rmsprop; adafactor keeps its own
    # adamw: decoupled (optax scales it by the lr); every other optimizer: L2, added to the
    # gradient before the optimizer.
    cfg.weight_decay = 0.0
    # False: no decay on params named bias/scale or with ndim <= 1 (biases, norms).
    cfg.decay_biases_and_norms = False
    cfg.clip_norm = 0.0  # global-norm clip of the (accumulated) gradient; 0 = off
    cfg.schedule = "constant"  # constant | warmup_cosine | warmup_linear | piecewise
    cfg.warmup_steps = 0  # linear from 0 to lr; not allowed with `constant`
    cfg.end_lr_factor = 0.0  # cosine/linear end at lr * end_lr_factor at total_steps
    cfg.boundaries = ()  # piecewise: increasing steps at which a scale is applied
    # piecewise: factor multiplied in at each boundary; factors compound, so
    # (0.1, 0.1) gives lr, lr/10, lr/100.
    cfg.scales = ()
    cfg.accumulate_steps = 1  # >1: optax.MultiSteps, one update per this many train steps
    cfg.freeze = ()  # regexes searched in '/'-joined param paths; matches never change
    # > 0: params matched by `freeze` are held fixed only until this train step, then train
    # (gradual unfreezing). They keep optimizer state from the start, so their moments are
    # warm when they unfreeze; 0 = frozen for good, with no optimizer state.
    cfg.unfreeze_at_step = 0
    # Discriminative learning rates: ((regex, factor), ...); a param's update is multiplied
    # by the factor of the first regex that `re.search`es its path (1.0 when none does). The
    # whole step is scaled, AdamW's decoupled weight decay included, as a PyTorch param
    # group's lr scales its decay.
    cfg.lr_multipliers = ()
    cfg.ema_decay = 0.0  # 0 = off; read by the train state via `ema_update`, not here
    return cfg


def param_paths(params):
    """Tree like `params` whose leaves (boxes count as leaves) are '/'-joined path strings."""
    return jax.tree.map_with_path(
        lambda path, _: "/".join(_key_str(k) for k in path), params, is_leaf=_is_box
    )


def freeze_mask(params, patterns, key: str = "optim.freeze"):
    """Bool tree like `params`: True where some regex in `patterns` `re.search`es the path."""
    paths = param_paths(params)
    all_paths = jax.tree.leaves(paths)
    for pattern in patterns:
        if not any(re.search(pattern, p) for p in all_paths):
            raise ValueError(
                f"{key} pattern {pattern!r} matches no parameter; expected a regex "
                f"searched in paths such as {all_paths[:8]}"
            )
    return jax.tree.map(lambda p: any(re.search(pat, p) for pat in patterns), paths)


def lr_factors(params, multipliers):
    """Float tree like `params`: the factor of the first (regex, factor) whose regex finds the path, else 1."""
    freeze_mask(params, [pattern for pattern, _ in multipliers], key="optim.lr_multipliers")
    return jax.tree.map(
        lambda p: next((float(f) for pat, f in multipliers if re.search(pat, p)), 1.0), param_paths(params))


def _map_boxed(fn, *trees):
    """jax.tree.map over params-like trees whose boxes count as leaves (fn sees plain arrays)."""
    def leaf(x, *rest):
        if _is_box(x):
            return x.replace_boxed(fn(x.value, *rest))
        return fn(x, *rest)
    return jax.tree.map(leaf, *trees, is_leaf=_is_box)


def scale_by_path(multipliers) -> optax.GradientTransformation:
    """Multiply each update by its param's factor from `lr_factors` (stateless)."""

    def update(updates, state, params=None):
        del params
        factors = lr_factors(updates, multipliers)
        return _map_boxed(lambda u, f: u * jnp.asarray(f, u.dtype), updates, factors), state

    def init(params):
        lr_factors(params, multipliers)  # a pattern matching no param fails here, before training
        return optax.EmptyState()

    return optax.GradientTransformation(init, update)


def freeze_until(patterns, step: int) -> optax.GradientTransformation:
    """Zero the updates of params matched by `patterns` for the first `step` calls, then pass them."""

    def init(params):
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        del params
        frozen = freeze_mask(updates, patterns)
        held = state.count < step
        updates = _map_boxed(lambda u, f: jnp.where(held & f, jnp.zeros_like(u), u), updates, frozen)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def clip_by_global_norm_until(max_norm: float, patterns, step: int) -> optax.GradientTransformation:
    """Global-norm clipping as optax's, except that for the first `step` calls the params matched
    by `patterns` (held frozen by `freeze_until`) do not count towards the norm: while they are
    held, the trainable params are clipped exactly as if the frozen ones were not there."""

    def init(params):
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        del params
        frozen = jax.tree.leaves(freeze_mask(updates, patterns))
        held = state.count < step
        leaves = jax.tree.leaves(nn.unbox(updates))
        squares = [jnp.where(held & f, 0.0, jnp.sum(jnp.square(u.astype(jnp.float32)))) for u, f in zip(leaves, frozen)]
        norm = jnp.sqrt(sum(squares))
        scale = jnp.where(norm > max_norm, max_norm / jnp.maximum(norm, 1e-30), 1.0)
        updates = _map_boxed(lambda u: (u * scale).astype(u.dtype), updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def decay_mask(params):
    """Bool tree like `params`: False on biases, norm scales/offsets and any param of ndim <= 1."""

    def decays(path, leaf):
        name = _key_str(path[-1]) if path else ""
        value = leaf.value if _is_box(leaf) else leaf
        return name not in _NO_DECAY_NAMES and len(value.shape) > 1

    return jax.tree.map_with_path(decays, params, is_leaf=_is_box)


def ema_update(ema_params, params, decay):
    """`decay * ema + (1 - decay) * params` leaf-wise, in the EMA's dtype."""
    return jax.tree.map(
        lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema_params, params
    )


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the train step, from cfg.schedule."""
    _check_schedule(cfg, total_steps)
    lr, warmup = cfg.lr, cfg.warmup_steps
    if cfg.schedule == "constant":
        return optax.constant_schedule(lr)
    elif cfg.schedule == "warmup_cosine":
        # alpha is the final fraction of the initial value.
        decay = optax.cosine_decay_schedule(lr, total_steps - warmup, alpha=cfg.end_lr_factor)
        after = _shifted(decay, warmup)
    elif cfg.schedule == "warmup_linear":
        decay = optax.linear_schedule(lr, lr * cfg.end_lr_factor, total_steps - warmup)
        after = _shifted(decay, warmup)
    elif cfg.schedule == "piecewise":
        # Boundaries are absolute train steps, so this one is not shifted by the warmup.
        after = optax.piecewise_constant_schedule(lr, dict(zip(cfg.boundaries, cfg.scales)))
    else:
        raise AssertionError(cfg.schedule)  # _check_schedule rejects unknown names
    if warmup == 0:
        return after
    warm = optax.linear_schedule(0.0, lr, warmup)
    return lambda step: jnp.where(step < warmup, warm(step), after(step))


def learning_rate(cfg: ml_collections.ConfigDict, total_steps: int, step: int) -> float:
    """The learning rate at train step `step`, for logging."""
    return float(make_schedule(cfg, total_steps)(step))


def make_optimizer(
    cfg: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """clip -> (L2) -> optimizer(schedule) [-> accumulate], with frozen params held at zero."""
    _check_optimizer(cfg)
    schedule = make_schedule(cfg, total_steps)
    k = cfg.accumulate_steps
    if k > 1:
        # MultiSteps' inner optimizer counts updates, not train steps.
        schedule = _every_kth(schedule, k)
    mask = None if cfg.decay_biases_and_norms else decay_mask  # None: decay every param
    parts = []
    if cfg.clip_norm > 0 and cfg.freeze and cfg.unfreeze_at_step > 0:
        # Frozen-for-now params still get gradients (their moments stay warm); they must not
        # shrink the trainable params' clipped steps.
        parts.append(clip_by_global_norm_until(cfg.clip_norm, tuple(cfg.freeze), cfg.unfreeze_at_step))
    elif cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    if cfg.weight_decay > 0 and cfg.name != "adamw":
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=mask))
    parts.append(_base_optimizer(cfg, schedule, mask))
    tx = optax.chain(*parts)
    if k > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
    if cfg.lr_multipliers:
        # After the optimizer, so it scales the step (adaptive optimizers would cancel a
        # scaled gradient), and accumulation's zero updates stay zero.
        tx = optax.chain(tx, scale_by_path(tuple(tuple(m) for m in cfg.lr_multipliers)))
    if cfg.freeze and cfg.unfreeze_at_step > 0:
        # Counted in train steps (the chain runs every train step, also when accumulating).
        tx = optax.chain(tx, freeze_until(tuple(cfg.freeze), cfg.unfreeze_at_step))
    elif cfg.freeze:
        # Accumulation sits inside the trainable branch so frozen params get no buffers.
        patterns = tuple(cfg.freeze)

        def labels(tree):
            frozen = freeze_mask(tree, patterns)
            return jax.tree.map(lambda f: "frozen" if f else "trainable", frozen)

        tx = optax.partition({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
    return tx


def _base_optimizer(cfg, schedule, mask) -> optax.GradientTransformation:
    """The named optax optimizer with `schedule` as its learning rate."""
    if cfg.name == "sgd":
        return optax.sgd(schedule)
    elif cfg.name == "momentum":
        return optax.sgd(schedule, momentum=cfg.momentum)
    elif cfg.name == "nesterov":
        return optax.sgd(schedule, momentum=cfg.momentum, nesterov=True)
    elif cfg.name == "adam":
        return optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    elif cfg.name == "adamw":
        return optax.adamw(
            schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask
        )
    elif cfg.name == "nadam":
        return optax.nadam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    elif cfg.name == "rmsprop":
        return optax.rmsprop(schedule, decay=cfg.b2, eps=cfg.eps)
    elif cfg.name == "adafactor":
        # optax defaults (relative to param scale, update clipping at 1.0).
        return optax.adafactor(schedule)
    raise AssertionError(cfg.name)  # _check_optimizer rejects unknown names


def _shifted(schedule, offset):
    """`schedule` started at train step `offset` instead of 0."""
    return lambda step: schedule(step - offset)


def _every_kth(schedule, k):
    """Schedule over optimizer updates that reads `schedule` at the update's first train step."""
    return lambda count: schedule(count * k)


def _is_box(x) -> bool:
    """Flax partitioning boxes are leaves for masks: their one child is the param."""
    return isinstance(x, nn.Partitioned)


def _key_str(key) -> str:
    """One path component as text."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    elif isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    elif isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    raise TypeError(f"expected a dict, attribute or sequence key in a param path, got {key!r}")


def _check_schedule(cfg, total_steps) -> None:
    """Raise ValueError naming the key, the value and what was expected."""
    _require(_is_int(total_steps) and total_steps > 0,
             "total_steps", total_steps, "a positive int")
    _require(cfg.lr > 0 and math.isfinite(cfg.lr), "optim.lr", cfg.lr, "a finite float > 0")
    _require(cfg.schedule in SCHEDULES, "optim.schedule", cfg.schedule, f"one of {SCHEDULES}")
    _require(_is_int(cfg.warmup_steps) and cfg.warmup_steps >= 0,
             "optim.warmup_steps", cfg.warmup_steps, "an int >= 0")
    if cfg.schedule == "constant":
        _require(cfg.warmup_steps == 0, "optim.warmup_steps", cfg.warmup_steps,
                 "0 with schedule='constant' (for warmup then constant use "
                 "schedule='warmup_linear', end_lr_factor=1.0)")
    else:
        _require(cfg.warmup_steps < total_steps, "optim.warmup_steps", cfg.warmup_steps,
                 f"< total_steps={total_steps}")
    _require(0.0 <= cfg.end_lr_factor <= 1.0, "optim.end_lr_factor", cfg.end_lr_factor,
             "a float in [0, 1]")
    bounds, scales = tuple(cfg.boundaries), tuple(cfg.scales)
    if cfg.schedule != "piecewise":
        _require(not bounds and not scales, "optim.boundaries/scales", (bounds, scales),
                 f"empty with schedule={cfg.schedule!r} (only 'piecewise' reads them)")
        return
    _require(len(bounds) == len(scales), "optim.boundaries/scales", (bounds, scales),
             "the same length")
    _require(all(_is_int(b) for b in bounds), "optim.boundaries", bounds, "ints")
    _require(all(a < b for a, b in zip(bounds, bounds[1:])), "optim.boundaries", bounds,
             "strictly increasing")
    _require(not bounds or bounds[0] >= max(cfg.warmup_steps, 1), "optim.boundaries", bounds,
             f"all >= max(warmup_steps, 1) = {max(cfg.warmup_steps, 1)}")
    _require(all(s >= 0 for s in scales), "optim.scales", scales, "factors >= 0")


def _check_optimizer(cfg) -> None:
    """Raise ValueError naming the key, the value and what was expected."""
    _require(cfg.name in OPTIMIZERS, "optim.name", cfg.name, f"one of {OPTIMIZERS}")
    _require(0.0 <= cfg.momentum < 1.0, "optim.momentum", cfg.momentum, "a float in [0, 1)")
    _require(0.0 <= cfg.b1 < 1.0, "optim.b1", cfg.b1, "a float in [0, 1)")
    _require(0.0 <= cfg.b2 < 1.0, "optim.b2", cfg.b2, "a float in [0, 1)")
    _require(cfg.eps > 0, "optim.eps", cfg.eps, "a float > 0")
    _require(cfg.weight_decay >= 0, "optim.weight_decay", cfg.weight_decay, "a float >= 0")
    _require(cfg.clip_norm >= 0, "optim.clip_norm", cfg.clip_norm, "a float >= 0 (0 = off)")
    _require(_is_int(cfg.accumulate_steps) and cfg.accumulate_steps >= 1,
             "optim.accumulate_steps", cfg.accumulate_steps, "an int >= 1")
    _require(0.0 <= cfg.ema_decay < 1.0, "optim.ema_decay", cfg.ema_decay,
             "a float in [0, 1) (0 = off)")
    _require(all(isinstance(p, str) for p in cfg.freeze), "optim.freeze", cfg.freeze,
             "a tuple of regex strings")
    for pattern in cfg.freeze:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"optim.freeze pattern {pattern!r} is not a valid regex: {e}") from e
    _require(_is_int(cfg.unfreeze_at_step) and cfg.unfreeze_at_step >= 0, "optim.unfreeze_at_step",
             cfg.unfreeze_at_step, "an int >= 0 (0: frozen params never unfreeze)")
    _require(cfg.unfreeze_at_step == 0 or bool(cfg.freeze), "optim.unfreeze_at_step", cfg.unfreeze_at_step,
             "0 when optim.freeze is empty (it unfreezes the params `freeze` matches)")
    for entry in cfg.lr_multipliers:
        ok = isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str) \
            and isinstance(entry[1], numbers.Real) and entry[1] >= 0
        _require(ok, "optim.lr_multipliers", cfg.lr_multipliers,
                 "a tuple of (regex, factor >= 0) pairs, e.g. (('^Conv', 0.1),)")
        try:
            re.compile(entry[0])
        except re.error as e:
            raise ValueError(f"optim.lr_multipliers pattern {entry[0]!r} is not a valid regex: {e}") from e


def _is_int(x) -> bool:
    """Python or numpy integer, but not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _require(ok: bool, key: str, got, expected: str) -> None:
    """Raise ValueError('<key> must be <expected>, got <got>') unless ok."""
    if not ok:
        raise ValueError(f"{key} must be {expected}, got {got!r}")
