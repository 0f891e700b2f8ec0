"""jaxml's BatchNorm: flax's values, statistics and derivatives, with two backward reductions."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxml.models import norm


def _variables(shape, seed=0):
    """Flax BatchNorm variables for inputs of `shape`, perturbed away from their init values."""
    v = nn.BatchNorm(use_running_average=False).init(jax.random.key(seed), jnp.ones(shape))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 8))
    return jax.tree.map(lambda a: a + 0.3 * jax.random.normal(next(keys), a.shape), v)


def _inputs(shape, seed=2):
    return 3.0 * jax.random.normal(jax.random.key(seed), shape) + 1.5


def _weights(shape):
    return jnp.sin(jnp.arange(np.prod(shape), dtype=jnp.float32)).reshape(shape)


def _loss(module, variables, params, x, weights=None):
    y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                              mutable=["batch_stats"])
    weights = _weights(y.shape) if weights is None else weights
    return jnp.sum(jnp.tanh(y.astype(jnp.float32)) * weights), (y, updates)


def _both(**kwargs):
    return nn.BatchNorm(**kwargs), norm.BatchNorm(**kwargs)


@pytest.mark.parametrize("shape", [(8, 5, 5, 6), (16, 7)])
def test_training_values_statistics_and_gradients_equal_flax(shape):
    ref, new = _both(use_running_average=False, momentum=0.9, epsilon=1e-5)
    v, x = _variables(shape), _inputs(shape)
    results = []
    for m in (ref, new):
        (loss, (y, updates)), grads = jax.value_and_grad(
            lambda p, x: _loss(m, v, p, x), (0, 1), has_aux=True)(v["params"], x)
        results.append((loss, y, updates, grads))
    (l0, y0, u0, g0), (l1, y1, u1, g1) = results
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), u1, u0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g1, g0)
    assert jax.tree.structure(u1) == jax.tree.structure(u0)


def test_same_variables_and_flax_paths_for_eval_and_masks():
    ref, new = _both(momentum=0.9)  # use_running_average given at call time
    x = _inputs((8, 4, 4, 3))
    v_ref = ref.init(jax.random.key(0), x, use_running_average=False)
    v_new = new.init(jax.random.key(0), x, use_running_average=False)
    assert jax.tree.map(jnp.shape, v_ref) == jax.tree.map(jnp.shape, v_new)
    jax.tree.map(np.testing.assert_array_equal, v_new, v_ref)
    v = _variables((8, 4, 4, 3))
    # Running averages and masks are flax's own code, bit for bit.
    np.testing.assert_array_equal(new.apply(v, x, use_running_average=True),
                                  ref.apply(v, x, use_running_average=True))
    mask = (jnp.arange(8) < 5)[:, None, None, None]
    a, _ = new.apply(v, x, use_running_average=False, mask=mask, mutable=["batch_stats"])
    b, _ = ref.apply(v, x, use_running_average=False, mask=mask, mutable=["batch_stats"])
    np.testing.assert_array_equal(a, b)
    # Without a mask the training path is jaxml's: same values, not the same code.
    a, _ = new.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(a, ref.apply(v, x, use_running_average=False, mutable=["batch_stats"])[0],
                               rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_statistics():
    ref, new = _both(use_running_average=False, momentum=0.9, dtype=jnp.bfloat16)
    v, x = _variables((8, 4, 4, 6)), _inputs((8, 4, 4, 6)).astype(jnp.bfloat16)
    (a, ua), (b, ub) = (m.apply(v, x, mutable=["batch_stats"]) for m in (new, ref))
    assert a.dtype == b.dtype == jnp.bfloat16
    assert ua["batch_stats"]["mean"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-2)
    g = jax.grad(lambda x: _loss(new, v, v["params"], x)[0])(x)
    assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


def test_forward_mode_and_hessian_vector_products_equal_flax():
    ref, new = _both(use_running_average=False)
    v, x = _variables((8, 3, 3, 4)), _inputs((8, 3, 3, 4))
    t = jax.random.normal(jax.random.key(5), x.shape)
    tp = jax.tree.map(lambda a: jax.random.normal(jax.random.key(6), a.shape), v["params"])

    def jvp(m):
        return jax.jvp(lambda p, x: _loss(m, v, p, x)[0], (v["params"], x), (tp, t))[1]

    def hvp(m):
        return jax.jvp(jax.grad(lambda p, x: _loss(m, v, p, x)[0], (0, 1)), (v["params"], x), (tp, t))[1]

    np.testing.assert_allclose(jvp(new), jvp(ref), rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), hvp(new), hvp(ref))
    # The batch statistics' own tangents: d mean = mean(dx), d var = 2 mean((x - mean) dx).
    stats = lambda x: norm.batch_norm(x, v["params"]["scale"], v["params"]["bias"], 1e-5)[1:]
    dmean, dvar = jax.jvp(stats, (x,), (t,))[1]
    dmean_ref, dvar_ref = jax.jvp(lambda x: (x.mean((0, 1, 2)), x.var((0, 1, 2))), (x,), (t,))[1]
    np.testing.assert_allclose(dmean, dmean_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dvar, dvar_ref, rtol=1e-4, atol=1e-5)


def _reductions(module, shape):
    v, x = _variables(shape), _inputs(shape)
    grad = jax.jit(jax.grad(lambda p, x: _loss(module, v, p, x)[0], (0, 1)))
    return len(re.findall(r"\breduce\(", grad.lower(v["params"], x).compile().as_text()))


def test_backward_pass_reduces_twice():
    # The loss's own sum is dead code under grad; what is left: two reductions forward
    # (mean, mean of squares), two backward (sum g, sum g * xhat). Flax's form leaves a third.
    ref, new = _both(use_running_average=False)
    assert _reductions(new, (8, 5, 5, 6)) == 4
    assert _reductions(ref, (8, 5, 5, 6)) > 4


def test_pmap_statistics_and_gradients_equal_the_global_batch():
    n = jax.local_device_count()
    ref, new = nn.BatchNorm(use_running_average=False), norm.BatchNorm(use_running_average=False, axis_name="d")
    v, x = _variables((4 * n, 3, 3, 5)), _inputs((4 * n, 3, 3, 5))

    def per_device(p, x, w):
        (loss, (y, updates)), grads = jax.value_and_grad(
            lambda p, x: _loss(new, v, p, x, w), (0, 1), has_aux=True)(p, x)
        return y, updates, jax.lax.psum(grads[0], "d"), grads[1]

    split = lambda a: a.reshape(n, 4, *a.shape[1:])
    y, updates, gp, gx = jax.pmap(per_device, axis_name="d", in_axes=(None, 0, 0))(
        v["params"], split(x), split(_weights(x.shape)))
    (_, (y0, u0)), (gp0, gx0) = jax.value_and_grad(
        lambda p, x: _loss(ref, v, p, x), (0, 1), has_aux=True)(v["params"], x)
    np.testing.assert_allclose(y.reshape(y0.shape), y0, rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6), updates, u0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-4, atol=1e-5), gp, gp0)
    np.testing.assert_allclose(gx.reshape(gx0.shape), gx0, rtol=1e-4, atol=1e-5)
