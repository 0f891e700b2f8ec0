"""Rematerialisation policies (jaxml.models.remat): every policy gives the same outputs and
gradients as none, really wraps the blocks in jax.checkpoint with its policy, and an unknown
policy is refused with the choices before anything compiles."""

import warnings

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import diffusion, gpt
from jaxml.models import remat, transformer, unet

POLICIES = ("full", "dots_saveable", "dots_with_no_batch_dims_saveable")


def _loss_and_grads(model, params, *inputs):
    def loss_fn(p):
        out = model.apply({"params": p}, *inputs)
        return jnp.mean(jnp.sin(out)), out  # not linear in the output: the backward pass needs activations

    (loss, out), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return loss, out, grads, _remat_policies(jax.make_jaxpr(loss_fn)(params).jaxpr)


def _remat_policies(jaxpr) -> list:
    """The policy of every jax.checkpoint in `jaxpr`, nested ones (inside scans) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("remat2", "checkpoint"):
            found.append(eqn.params["policy"])
        for value in eqn.params.values():
            if isinstance(value, jax.extend.core.ClosedJaxpr):
                found += _remat_policies(value.jaxpr)
            elif isinstance(value, jax.extend.core.Jaxpr):
                found += _remat_policies(value)
    return found


def _assert_same(reference, other):
    loss_a, out_a, grads_a, _ = reference
    loss_b, out_b, grads_b, _ = other
    np.testing.assert_allclose(out_a, out_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5, atol=1e-7)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def _assert_policy_in(policies: list, policy: str):
    if policy == "none":
        assert policies == []
        return
    assert policies, f"no jax.checkpoint in the jaxpr for remat={policy!r}"
    # "full" is jax.checkpoint's default policy (None): save nothing but the inputs.
    expected = None if policy == "full" else getattr(jax.checkpoint_policies, policy)
    assert all(p is expected for p in policies), (policy, policies)


# Each policy once, split over the scanned stack (the default) and the unrolled one (prevent_cse on):
# every compile of a gradient takes seconds on 2 CPU cores.
@pytest.mark.parametrize("scan_layers, policies", [(True, POLICIES[:2]), (False, POLICIES[2:])])
def test_transformer_policies_give_the_same_outputs_and_gradients(scan_layers, policies):
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 50)
    models = {p: transformer.Tiny(vocab_size=50, scan_layers=scan_layers, remat=p) for p in ("none",) + policies}
    params = jax.jit(models["none"].init)(jax.random.key(1), tokens)["params"]
    reference = _loss_and_grads(models["none"], params, tokens)
    _assert_policy_in(reference[3], "none")
    for policy in policies:
        result = _loss_and_grads(models[policy], params, tokens)
        _assert_same(reference, result)
        _assert_policy_in(result[3], policy)


def test_booleans_still_mean_full_and_none():
    assert (remat.check(True), remat.check(False)) == ("full", "none")
    tokens = jnp.zeros((1, 4), jnp.int32)
    params = jax.eval_shape(transformer.Tiny(vocab_size=50).init, jax.random.key(0), tokens)["params"]
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    jaxpr = jax.make_jaxpr(lambda p: transformer.Tiny(vocab_size=50, remat=True).apply({"params": p}, tokens))(params)
    _assert_policy_in(_remat_policies(jaxpr.jaxpr), "full")


def test_unet_res_blocks_take_the_policy_with_the_same_parameters_and_gradients():
    # Numbers on one residual block (the whole U-Net's gradient takes minutes to compile on 2 CPU
    # cores); the U-Net's wiring from its jaxpr and parameter shapes, traced without compiling.
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    emb = jax.random.normal(jax.random.key(1), (2, 16))
    block = unet.ResBlock(8, groups=4)
    params = jax.jit(block.init, static_argnums=3)(jax.random.key(2), x, emb, True)["params"]
    params = jax.tree.map(lambda p: p + 0.1, params)  # the last conv starts at zero: no gradient below it
    reference = _loss_and_grads(block, params, x, emb, False)
    _assert_policy_in(reference[3], "none")
    for policy in ("full", "dots_saveable"):
        wrapped = remat.wrap(unet.ResBlock, policy, static_argnums=(3,))(8, groups=4)
        result = _loss_and_grads(wrapped, params, x, emb, False)
        _assert_same(reference, result)
        _assert_policy_in(result[3], policy)

    x, t, y = jnp.ones((2, 8, 8, 1)), jnp.array([1, 4]), jnp.array([2, 10])
    shapes = {}
    for policy in ("none", "dots_with_no_batch_dims_saveable"):
        net = unet.Tiny(num_classes=10, remat=policy)
        shapes[policy] = jax.eval_shape(net.init, jax.random.key(0), x, t, y)["params"]
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[policy])
        jaxpr = jax.make_jaxpr(lambda p: net.apply({"params": p}, x, t, y, train=True,
                                                   rngs={"dropout": jax.random.key(0)}))(zeros)
        policies = _remat_policies(jaxpr.jaxpr)
        _assert_policy_in(policies, policy)
        blocks = [name for name in shapes[policy] if name.startswith("ResBlock_")]
        assert policy == "none" or len(policies) == len(blocks) == 8  # Tiny: 2 down, 2 middle, 4 up
    assert jax.tree.structure(shapes["none"]) == jax.tree.structure(shapes["dots_with_no_batch_dims_saveable"])


def test_unknown_policy_is_refused_with_the_choices_before_compiling():
    with pytest.raises(ValueError, match="unknown remat policy 'sometimes'; expected one of none, full, dots_saveable"):
        jax.eval_shape(transformer.Tiny(vocab_size=50, remat="sometimes").init, jax.random.key(0),
                       jnp.zeros((1, 4), jnp.int32))
    config = gpt.get_config("tiny")
    config.model.remat = "dots"
    batch = {"tokens": jnp.zeros((2, 9), jnp.int32)}
    with pytest.raises(ValueError, match="unknown remat policy 'dots'; expected one of"):
        jax.eval_shape(lambda r: gpt.init(config, r, batch), jax.random.key(0))  # init is traced, nothing compiled
    config = diffusion.get_config("tiny")
    config.model.remat = "everything"
    with pytest.raises(ValueError, match="unknown remat policy 'everything'"):
        diffusion.model(config)
    with pytest.raises(ValueError, match="unknown remat policy 1"):
        remat.check(1)


def test_unrolled_remat_saves_memory_exactly_where_no_warning_says_it_cannot():
    """jaxlib 0.10's XLA:CPU merges an unrolled block's recomputation back into the forward pass
    (the backward pass keeps every activation), so `remat.wrap` warns there; scanned stacks save
    memory everywhere. The warning must match what XLA does on this jaxlib (3.11 and 3.12 CI)."""
    tokens = jax.random.randint(jax.random.key(0), (8, 128), 0, 50)
    temp_mb, warned = {}, {}
    for scan in (False, True):
        for policy in ("none", "full"):
            model = transformer.Tiny(vocab_size=50, max_len=128, num_layers=3, scan_layers=scan, remat=policy)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                params = jax.eval_shape(model.init, jax.random.key(1), tokens)["params"]
            warned[scan, policy] = any("saves no memory" in str(w.message) for w in caught)
            loss = lambda p, model=model: jnp.mean(jnp.sin(model.apply({"params": p}, tokens)))
            compiled = jax.jit(jax.grad(loss)).lower(params).compile()
            temp_mb[scan, policy] = compiled.memory_analysis().temp_size_in_bytes / 2**20
    saves = {scan: temp_mb[scan, "full"] < 0.7 * temp_mb[scan, "none"] for scan in (False, True)}
    assert saves[True] and not warned[True, "full"], (temp_mb, warned)  # scanned: ~9 MB against ~20
    assert not warned[False, "none"] and not warned[True, "none"]
    assert warned[False, "full"] == remat.merges_unrolled_recomputation() == (not saves[False]), (temp_mb, warned)
