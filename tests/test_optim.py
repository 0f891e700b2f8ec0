"""Tests for jaxml.train.optim: optimizers, schedules, masks, accumulation, boxed params."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxml.train import optim


def _cfg(**overrides):
    """default_config() with overrides, locked like the engine locks it."""
    cfg = optim.default_config()
    cfg.update(overrides)
    cfg.lock()
    return cfg


def _params():
    """A small tree with a kernel, a bias, a norm scale and an embedding."""
    return {
        "dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
        "norm": {"scale": jnp.ones((4,))},
        "embed": {"embedding": jnp.ones((5, 2))},
    }


def _step(tx, params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def _quadratic(params):
    return sum(jnp.sum((w - 3.0) ** 2) for w in jax.tree.leaves(params))


# Per-optimizer lrs that make 200 steps on the quadratic converge well.
_LRS = {"sgd": 0.05, "momentum": 0.02, "nesterov": 0.02, "adam": 0.05, "adamw": 0.05,
        "nadam": 0.05, "rmsprop": 0.02, "adafactor": 0.05}


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_reduces_a_quadratic(name):
    tx = optim.make_optimizer(_cfg(name=name, lr=_LRS[name]), total_steps=200)
    params = _params()

    @jax.jit
    def run(params):
        def body(_, carry):
            params, state = carry
            return _step(tx, params, state, jax.grad(_quadratic)(params))

        return jax.lax.fori_loop(0, 200, body, (params, tx.init(params)))[0]

    start, end = float(_quadratic(params)), float(_quadratic(run(params)))
    assert end < 0.05 * start, f"{name}: loss {start} -> {end}, expected a 20x drop"


def test_schedule_names_and_optimizer_names_are_the_documented_ones():
    assert set(_LRS) == set(optim.OPTIMIZERS)
    assert optim.SCHEDULES == ("constant", "warmup_cosine", "warmup_linear", "piecewise")


def test_constant_schedule_is_constant():
    sched = optim.make_schedule(_cfg(lr=0.3), total_steps=100)
    np.testing.assert_allclose([float(sched(s)) for s in (0, 1, 50, 100, 1000)], [0.3] * 5)


def test_warmup_cosine_matches_closed_form():
    lr, warmup, total, end = 0.1, 10, 110, 0.1
    sched = optim.make_schedule(
        _cfg(lr=lr, schedule="warmup_cosine", warmup_steps=warmup, end_lr_factor=end), total
    )

    def closed(t):
        if t < warmup:
            return lr * t / warmup
        frac = min(t - warmup, total - warmup) / (total - warmup)
        return lr * end + (lr - lr * end) * 0.5 * (1 + math.cos(math.pi * frac))

    for t in (0, 5, warmup, 35, 60, total, total + 50):
        np.testing.assert_allclose(float(sched(t)), closed(t), rtol=1e-5, atol=1e-9,
                                   err_msg=f"step {t}")
    assert float(sched(0)) == 0.0 and math.isclose(float(sched(warmup)), lr, rel_tol=1e-6)
    assert math.isclose(float(sched(total)), lr * end, rel_tol=1e-5)


def test_warmup_linear_matches_closed_form():
    lr, warmup, total, end = 0.2, 4, 24, 0.25
    sched = optim.make_schedule(
        _cfg(lr=lr, schedule="warmup_linear", warmup_steps=warmup, end_lr_factor=end), total
    )
    for t in (0, 2, warmup, 14, total, total + 7):
        expected = (lr * t / warmup if t < warmup
                    else lr + (lr * end - lr) * min(t - warmup, total - warmup) / (total - warmup))
        np.testing.assert_allclose(float(sched(t)), expected, rtol=1e-5, err_msg=f"step {t}")


def test_decaying_schedule_without_warmup_starts_at_lr():
    sched = optim.make_schedule(_cfg(lr=0.5, schedule="warmup_cosine"), total_steps=10)
    np.testing.assert_allclose([float(sched(0)), float(sched(10))], [0.5, 0.0], atol=1e-7)


def test_piecewise_factors_compound_at_their_boundaries():
    sched = optim.make_schedule(
        _cfg(lr=1.0, schedule="piecewise", boundaries=(10, 20), scales=(0.1, 0.5)), 30
    )
    got = [float(sched(t)) for t in (0, 9, 10, 19, 20, 29)]
    np.testing.assert_allclose(got, [1.0, 1.0, 0.1, 0.1, 0.05, 0.05], rtol=1e-6)


def test_piecewise_with_warmup_keeps_absolute_boundaries():
    sched = optim.make_schedule(
        _cfg(lr=1.0, schedule="piecewise", warmup_steps=4, boundaries=(10,), scales=(0.1,)), 30
    )
    got = [float(sched(t)) for t in (0, 2, 4, 9, 10)]
    np.testing.assert_allclose(got, [0.0, 0.5, 1.0, 1.0, 0.1], rtol=1e-6)


def test_learning_rate_reads_the_schedule():
    cfg = _cfg(lr=0.1, schedule="warmup_linear", warmup_steps=10)
    assert math.isclose(optim.learning_rate(cfg, 100, 5), 0.05, rel_tol=1e-6)


def test_clipping_bounds_the_sgd_update_norm():
    tx = optim.make_optimizer(_cfg(name="sgd", lr=0.5, clip_norm=2.0), total_steps=10)
    params = _params()
    huge = jax.tree.map(lambda p: 1e6 * jnp.ones_like(p), params)
    updates, _ = tx.update(huge, tx.init(params), params)
    np.testing.assert_allclose(float(optax.tree.norm(updates)), 0.5 * 2.0, rtol=1e-5)
    small = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
    updates, _ = tx.update(small, tx.init(params), params)
    np.testing.assert_allclose(float(optax.tree.norm(updates)),
                               0.5 * float(optax.tree.norm(small)), rtol=1e-5)


def test_decay_mask_skips_biases_norms_and_vectors():
    params = {**_params(), "vector": jnp.ones((7,)), "head": {"w": jnp.ones((2, 2))}}
    assert optim.decay_mask(params) == {
        "dense": {"kernel": True, "bias": False}, "norm": {"scale": False},
        "embed": {"embedding": True}, "vector": False, "head": {"w": True},
    }


@pytest.mark.parametrize("name", ["adamw", "sgd", "adam"])
def test_weight_decay_shrinks_kernels_only(name):
    tx = optim.make_optimizer(_cfg(name=name, lr=0.1, weight_decay=0.5), total_steps=10)
    params = _params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    new, _ = _step(tx, params, tx.init(params), zeros)
    assert float(new["dense"]["kernel"].max()) < 1.0
    assert float(new["embed"]["embedding"].max()) < 1.0
    np.testing.assert_array_equal(new["dense"]["bias"], params["dense"]["bias"])
    np.testing.assert_array_equal(new["norm"]["scale"], params["norm"]["scale"])


def test_decay_biases_and_norms_true_decays_everything():
    cfg = _cfg(name="sgd", lr=0.1, weight_decay=0.5, decay_biases_and_norms=True)
    tx = optim.make_optimizer(cfg, total_steps=10)
    params = _params()
    new, _ = _step(tx, params, tx.init(params), jax.tree.map(jnp.zeros_like, params))
    for leaf in jax.tree.leaves(new):
        np.testing.assert_allclose(leaf, 1.0 - 0.1 * 0.5, rtol=1e-6)


def test_param_paths_and_freeze_mask():
    params = _params()
    assert optim.param_paths(params)["dense"]["kernel"] == "dense/kernel"
    mask = optim.freeze_mask(params, ("^dense/", "scale$"))
    assert mask == {"dense": {"kernel": True, "bias": True}, "norm": {"scale": True},
                    "embed": {"embedding": False}}


def _state_size(state):
    """Elements in every non-scalar leaf of an optimizer state (the buffers)."""
    return sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_frozen_params_are_bit_identical_and_have_no_state(accumulate):
    cfg = _cfg(name="adam", lr=0.1, freeze=("^dense/",), accumulate_steps=accumulate,
               weight_decay=0.1, clip_norm=1.0)
    tx = optim.make_optimizer(cfg, total_steps=20)
    params = jax.tree.map(lambda p: p * 1.2345, _params())
    state = tx.init(params)
    step = jax.jit(lambda p, s: _step(tx, p, s, jax.grad(_quadratic)(p)))
    new = params
    for _ in range(6):
        new, state = step(new, state)
    np.testing.assert_array_equal(new["dense"]["kernel"], params["dense"]["kernel"])
    np.testing.assert_array_equal(new["dense"]["bias"], params["dense"]["bias"])
    assert not np.array_equal(new["embed"]["embedding"], params["embed"]["embedding"])
    trainable = params["norm"]["scale"].size + params["embed"]["embedding"].size
    # adam's mu and nu, plus MultiSteps' accumulator when accumulating.
    buffers = 2 + (accumulate > 1)
    assert _state_size(state) == buffers * trainable


def test_freeze_typo_names_the_pattern():
    tx = optim.make_optimizer(_cfg(freeze=("dnese/kernel",)), total_steps=10)
    with pytest.raises(ValueError, match=r"dnese/kernel.*dense/kernel"):
        tx.init(_params())


def test_accumulation_updates_every_kth_step_with_the_mean_gradient():
    lr, k = 0.1, 4
    tx = optim.make_optimizer(_cfg(name="sgd", lr=lr, accumulate_steps=k), total_steps=40)
    params = _params()
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: _step(tx, p, s, g))
    grads = [jax.tree.map(lambda p, i=i: (i + 1.0) * jnp.ones_like(p) * (1 + p.ndim), params)
             for i in range(2 * k)]
    history = [params]
    for g in grads:
        new, state = step(history[-1], state, g)
        history.append(new)
    for t in range(1, 2 * k + 1):
        changed = not all(np.array_equal(a, b) for a, b in
                          zip(jax.tree.leaves(history[t]), jax.tree.leaves(history[t - 1])))
        assert changed == (t % k == 0), f"train step {t}: changed={changed}"
    for window in range(2):
        mean = jax.tree.map(lambda *g: sum(g) / k, *grads[window * k:(window + 1) * k])
        expected = jax.tree.map(lambda p, g: p - lr * g, history[window * k], mean)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                     history[(window + 1) * k], expected)


def test_accumulation_reads_the_schedule_in_train_steps():
    cfg = _cfg(name="sgd", lr=1.0, schedule="warmup_linear", warmup_steps=4,
               end_lr_factor=1.0, accumulate_steps=2)
    tx = optim.make_optimizer(cfg, total_steps=8)
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    ones = {"w": jnp.ones(())}
    lrs = []
    for _ in range(4):  # two updates: at train steps 0-1 and 2-3
        updates, state = tx.update(ones, state, params)
        lrs.append(-float(updates["w"]))
    # Each update uses the lr at the first train step of its window: steps 0 and 2.
    np.testing.assert_allclose(lrs, [0.0, 0.0, 0.0, 0.5], atol=1e-7)


def test_ema_update_matches_formula():
    ema, params = _params(), jax.tree.map(lambda p: 3.0 * p, _params())
    got = jax.jit(optim.ema_update)(ema, params, 0.9)
    jax.tree.map(lambda g, e, p: np.testing.assert_allclose(g, 0.9 * e + 0.1 * p, rtol=1e-6),
                 got, ema, params)


class _Tiny(nn.Module):
    """Dense with a logically partitioned kernel, then LayerNorm."""

    @nn.compact
    def __call__(self, x_BxD):
        init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
        return nn.LayerNorm()(nn.Dense(4, kernel_init=init)(x_BxD))


def _boxed():
    """Boxed params from Module.init, an input batch and a loss over boxed params."""
    model, x_BxD = _Tiny(), jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    params = model.init(jax.random.key(0), x_BxD)["params"]
    assert isinstance(params["Dense_0"]["kernel"], nn.LogicallyPartitioned)
    return params, lambda p: jnp.sum((model.apply({"params": p}, x_BxD) - 1.0) ** 2)


@pytest.mark.parametrize("name", ["adamw", "sgd", "momentum"])
def test_boxed_params_keep_their_boxes_in_state_and_updates(name):
    params, loss = _boxed()
    tx = optim.make_optimizer(_cfg(name=name, lr=0.1, clip_norm=1.0), total_steps=10)
    state = tx.init(params)
    boxes = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nn.Partitioned))
             if isinstance(x, nn.LogicallyPartitioned)]
    expected = {"adamw": 2, "sgd": 0, "momentum": 1}[name]  # mu+nu, nothing, trace
    assert len(boxes) == expected and all(b.names == ("embed", "mlp") for b in boxes)
    specs = jax.tree.leaves(nn.get_partition_spec(jax.eval_shape(tx.init, params)))
    assert specs.count(jax.sharding.PartitionSpec("embed", "mlp")) == expected

    step = jax.jit(lambda p, s: _step(tx, p, s, jax.grad(loss)(p)))
    new, state = step(params, state)
    new, state = step(new, state)
    assert isinstance(new["Dense_0"]["kernel"], nn.LogicallyPartitioned)
    assert float(loss(new)) < float(loss(params))


def test_masks_work_on_boxed_params():
    params, loss = _boxed()
    assert optim.decay_mask(params) == {
        "Dense_0": {"kernel": True, "bias": False},
        "LayerNorm_0": {"scale": False, "bias": False},
    }
    cfg = _cfg(name="adamw", lr=0.1, weight_decay=0.5, freeze=("LayerNorm_0/scale",))
    tx = optim.make_optimizer(cfg, total_steps=10)
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    new, _ = jax.jit(lambda p, s, g: _step(tx, p, s, g))(params, state, zeros)
    kernel, new_kernel = params["Dense_0"]["kernel"].value, new["Dense_0"]["kernel"].value
    np.testing.assert_allclose(new_kernel, kernel * (1 - 0.1 * 0.5), rtol=1e-6)
    np.testing.assert_array_equal(new["Dense_0"]["bias"], params["Dense_0"]["bias"])

    new, _ = jax.jit(lambda p, s: _step(tx, p, s, jax.grad(loss)(p)))(params, state)
    np.testing.assert_array_equal(new["LayerNorm_0"]["scale"], params["LayerNorm_0"]["scale"])
    assert not np.array_equal(new["LayerNorm_0"]["bias"], params["LayerNorm_0"]["bias"])
    trainable = sum(x.size for x in jax.tree.leaves(params)) - params["LayerNorm_0"]["scale"].size
    assert _state_size(state) == 2 * trainable


@pytest.mark.parametrize("overrides, message", [
    ({"lr": -1.0}, r"optim\.lr must be a finite float > 0, got -1\.0"),
    ({"name": "adamm"}, r"optim\.name must be one of \('sgd'.*'adafactor'\), got 'adamm'"),
    ({"schedule": "cosine"}, r"optim\.schedule must be one of \('constant'.*got 'cosine'"),
    ({"schedule": "piecewise", "boundaries": (10, 20), "scales": (0.1,)},
     r"optim\.boundaries/scales must be the same length"),
    ({"schedule": "piecewise", "boundaries": (20, 10), "scales": (0.1, 0.1)},
     r"optim\.boundaries must be strictly increasing, got \(20, 10\)"),
    ({"schedule": "warmup_cosine", "warmup_steps": 100}, r"warmup_steps must be < total_steps=100"),
    ({"warmup_steps": 5}, r"warmup_steps must be 0 with schedule='constant'"),
    ({"boundaries": (10,), "scales": (0.1,)}, r"only 'piecewise' reads them"),
    ({"accumulate_steps": 0}, r"optim\.accumulate_steps must be an int >= 1, got 0"),
    ({"freeze": ("(",)}, r"optim\.freeze pattern '\(' is not a valid regex"),
    ({"ema_decay": 1.0}, r"optim\.ema_decay must be a float in \[0, 1\)"),
])
def test_bad_config_fails_loudly(overrides, message):
    with pytest.raises(ValueError, match=message):
        optim.make_optimizer(_cfg(**overrides), total_steps=100)


def test_default_config_keys():
    assert set(optim.default_config()) == {
        "name", "lr", "momentum", "b1", "b2", "eps", "weight_decay", "decay_biases_and_norms",
        "clip_norm", "schedule", "warmup_steps", "end_lr_factor", "boundaries", "scales",
        "accumulate_steps", "freeze", "unfreeze_at_step", "lr_multipliers", "ema_decay",
    }
