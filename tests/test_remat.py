"""Rematerialisation policies (jaxml.models.remat): every policy gives the same outputs and
gradients as none, really wraps the blocks in jax.checkpoint with its policy, saves memory
unrolled as well as scanned (the cotangent-tied form where XLA would undo plain jax.checkpoint),
and an unknown policy is refused with the choices before anything compiles."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import diffusion, gpt
from jaxml.models import remat, transformer, unet

POLICIES = ("full", "dots_saveable", "dots_with_no_batch_dims_saveable")


def _loss_and_grads(model, params, *inputs, **kwargs):
    def loss_fn(p):
        out = model.apply({"params": p}, *inputs, **kwargs)
        return jnp.mean(jnp.sin(out)), out  # not linear in the output: the backward pass needs activations

    step = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, out), grads = jax.jit(step)(params)
    # The gradient's program: the tied form's checkpoint is traced only when its VJP is.
    return loss, out, grads, _remat_policies(jax.make_jaxpr(step)(params).jaxpr)


@pytest.fixture(params=[False, True], ids=["plain", "tied"])
def tied(request, monkeypatch):
    """Unrolled blocks both ways on every jaxlib: nn.remat, and the cotangent-tied custom VJP that
    `remat.wrap` picks where XLA merges plain recomputation back (jaxlib < 0.11 on CPU)."""
    monkeypatch.setattr(remat, "merges_unrolled_recomputation", lambda: request.param)
    return request.param


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


# Each policy once, split over the scanned stack (the default) and the unrolled one (prevent_cse on;
# plain nn.remat and the cotangent-tied form, `tied` above), in training mode with dropout (its
# random streams must reach the recomputation unchanged): each gradient compiles for seconds.
@pytest.mark.parametrize("scan_layers, policies, tie", [(True, POLICIES[:2], False), (False, POLICIES[1:], False),
                                                        (False, POLICIES[1:], True)], ids=["scan", "plain", "tied"])
def test_transformer_policies_give_the_same_outputs_and_gradients(scan_layers, policies, tie, monkeypatch):
    monkeypatch.setattr(remat, "merges_unrolled_recomputation", lambda: tie)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 50)
    models = {p: transformer.Tiny(vocab_size=50, scan_layers=scan_layers, remat=p, dropout=0.2)
              for p in ("none",) + policies}
    params = jax.jit(models["none"].init)(jax.random.key(1), tokens)["params"]
    train = dict(train=True, rngs={"dropout": jax.random.key(2)})
    reference = _loss_and_grads(models["none"], params, tokens, **train)
    _assert_policy_in(reference[3], "none")
    for policy in policies:
        result = _loss_and_grads(models[policy], params, tokens, **train)
        _assert_same(reference, result)
        _assert_policy_in(result[3], policy)


def test_booleans_still_mean_full_and_none():
    assert (remat.check(True), remat.check(False)) == ("full", "none")
    tokens = jnp.zeros((1, 4), jnp.int32)
    params = jax.eval_shape(transformer.Tiny(vocab_size=50).init, jax.random.key(0), tokens)["params"]
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    jaxpr = jax.make_jaxpr(lambda p: transformer.Tiny(vocab_size=50, remat=True).apply({"params": p}, tokens))(params)
    _assert_policy_in(_remat_policies(jaxpr.jaxpr), "full")


def test_unet_res_blocks_take_the_policy_with_the_same_parameters_and_gradients(tied):
    # Numbers on one residual block (the whole U-Net's gradient takes minutes to compile on 2 CPU
    # cores), with dropout and `train` a static argument; the U-Net's wiring from its jaxpr and
    # parameter shapes, traced without compiling.
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    emb = jax.random.normal(jax.random.key(1), (2, 16))
    block = unet.ResBlock(8, groups=4, dropout=0.3)
    params = jax.jit(block.init, static_argnums=3)(jax.random.key(2), x, emb, True)["params"]
    params = jax.tree.map(lambda p: p + 0.1, params)  # the last conv starts at zero: no gradient below it
    for train in (False, True):
        rngs = {"rngs": {"dropout": jax.random.key(3)}} if train else {}
        reference = _loss_and_grads(block, params, x, emb, train, **rngs)
        _assert_policy_in(reference[3], "none")
        for policy in ("full", "dots_saveable"):
            wrapped = remat.wrap(unet.ResBlock, policy, static_argnums=(3,))(8, groups=4, dropout=0.3)
            result = _loss_and_grads(wrapped, params, x, emb, train, **rngs)
            _assert_same(reference, result)
            _assert_policy_in(result[3], policy)

    x, t, y = jnp.ones((2, 8, 8, 1)), jnp.array([1, 4]), jnp.array([2, 10])
    shapes = {}
    for policy in ("none", "dots_with_no_batch_dims_saveable"):
        net = unet.Tiny(num_classes=10, remat=policy)
        shapes[policy] = jax.eval_shape(net.init, jax.random.key(0), x, t, y)["params"]
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[policy])
        loss = lambda p, net=net: jnp.sum(net.apply({"params": p}, x, t, y, train=True,
                                                    rngs={"dropout": jax.random.key(0)}))
        jaxpr = jax.make_jaxpr(jax.grad(loss))(zeros)  # traced, not compiled
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


def test_remat_saves_memory_unrolled_and_scanned_and_plain_checkpoint_fails_exactly_where_detected(monkeypatch):
    """jaxlib 0.10's XLA:CPU merges an unrolled plain jax.checkpoint's recomputation back into the
    forward pass (the backward pass keeps every activation); `merges_unrolled_recomputation` must
    say so exactly there (3.11 and 3.12 CI), and what `wrap` builds must save memory everywhere."""
    tokens = jax.random.randint(jax.random.key(0), (8, 128), 0, 50)
    merges = remat.merges_unrolled_recomputation()

    def temp_mb(scan, policy, tied=merges):
        monkeypatch.setattr(remat, "merges_unrolled_recomputation", lambda: tied)
        model = transformer.Tiny(vocab_size=50, max_len=128, num_layers=3, scan_layers=scan, remat=policy)
        params = jax.eval_shape(model.init, jax.random.key(1), tokens)["params"]
        loss = lambda p: jnp.mean(jnp.sin(model.apply({"params": p}, tokens)))
        return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes / 2**20

    mb = {(scan, policy): temp_mb(scan, policy) for scan in (False, True) for policy in ("none", "full")}
    mb["plain"] = temp_mb(False, "full", tied=False)
    assert mb[True, "full"] < 0.6 * mb[True, "none"], mb  # scanned: ~9 MB against ~20
    assert mb[False, "full"] < 0.75 * mb[False, "none"], mb  # unrolled, as wrap builds it: ~8 against ~16
    assert (mb["plain"] > 0.9 * mb[False, "none"]) == merges, mb  # plain nn.remat unrolled: ~18 on 0.10, ~8 on 0.12


def test_hessian_vector_products_work_and_forward_mode_names_itself_where_tied(tied):
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 50)
    models = {p: transformer.Tiny(vocab_size=50, scan_layers=False, remat=p) for p in ("none", "full")}
    params = jax.jit(models["none"].init)(jax.random.key(1), tokens)["params"]
    f = {p: (lambda q, m=m: jnp.sum(jnp.sin(m.apply({"params": q}, tokens)))) for p, m in models.items()}
    # Forward over reverse (Hessian-vector products) works through both forms, and agrees.
    hvp = {p: jax.jit(lambda q, f=f[p]: jax.jvp(jax.grad(f), (q,), (q,))[1])(params) for p in f}
    for a, b in zip(jax.tree.leaves(hvp["none"]), jax.tree.leaves(hvp["full"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
    if tied:  # documented in jaxml.models.remat: plain forward mode needs the scanned stack or jaxlib >= 0.11
        with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
            jax.jvp(f["full"], (params,), (params,))
    else:
        _, tangent = jax.jvp(f["full"], (params,), (params,))
        np.testing.assert_allclose(tangent, jax.jvp(f["none"], (params,), (params,))[1], rtol=1e-4)


def test_the_tie_leaves_the_residuals_unchanged_whatever_the_cotangent():
    residuals = {"x": jnp.arange(6.0).reshape(2, 3), "bf16": jnp.ones(3, jnp.bfloat16), "key": jax.random.key(0),
                 "ids": jnp.arange(4)}
    for first in (2.5, 0.0, -jnp.inf, jnp.inf, jnp.nan):  # a non-finite cotangent must not poison them (0 * inf)
        cotangent = (jnp.zeros((0, 3)), jnp.full((2, 2), 7.0).at[0, 0].set(first), None)  # an empty leaf is skipped
        tied = jax.jit(remat._tie)(residuals, cotangent)
        for name in ("x", "bf16", "ids"):
            np.testing.assert_array_equal(tied[name], residuals[name], err_msg=f"{name}, cotangent[0] = {first}")
            assert tied[name].dtype == residuals[name].dtype
        assert tied["key"].dtype == residuals["key"].dtype
    assert remat._tie(residuals, (None,)) is residuals  # nothing to tie to
