"""Transfer learning: path-mapped restore from another run, freezing schedules, discriminative learning rates."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import cnn
from jaxml import transfer
from jaxml.train import loop, optim
from tests.test_engine import tiny_config
from tests.test_optim import _cfg


def _params():
    return {"backbone": {"kernel": jnp.full((3, 4), 1.5), "bias": jnp.full((4,), 0.5)},
            "head": {"kernel": jnp.full((4, 2), -1.0), "bias": jnp.zeros((2,))}}


def _loss(params):
    return sum(jnp.sum((w - 3.0) ** 2) for w in jax.tree.leaves(params))


def _train(tx, params, steps):
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        updates, s = tx.update(jax.grad(_loss)(p), s, p)
        return optax.apply_updates(p, updates), s

    history = [params]
    for _ in range(steps):
        params, state = step(params, state)
        history.append(params)
    return history, state


def test_unfreeze_at_step_holds_the_backbone_then_trains_it():
    cfg = _cfg(name="adam", lr=0.1, freeze=("^backbone/",), unfreeze_at_step=3)
    history, state = _train(optim.make_optimizer(cfg, 10), _params(), 6)
    for t in range(4):  # steps 0, 1, 2 applied zero updates to the backbone
        jax.tree.map(np.testing.assert_array_equal, history[t]["backbone"], _params()["backbone"])
    assert not np.array_equal(history[4]["backbone"]["kernel"], _params()["backbone"]["kernel"])
    assert not np.array_equal(history[1]["head"]["kernel"], _params()["head"]["kernel"])
    # The backbone kept Adam moments while frozen, so its first step is an ordinary Adam step
    # (|update| <= lr), not the spike of a cold start.
    assert np.abs(history[4]["backbone"]["kernel"] - history[3]["backbone"]["kernel"]).max() <= 0.1 + 1e-6


def test_unfreeze_at_step_clips_the_trainable_params_as_if_the_held_ones_were_absent():
    """While held, the backbone's gradients (kept for its moments) do not count in the global-norm
    clip: the head moves exactly as with a backbone frozen for good; after unfreezing, all count."""
    common = dict(name="sgd", lr=0.1, clip_norm=0.5, freeze=("^backbone/",))
    held, _ = _train(optim.make_optimizer(_cfg(**common, unfreeze_at_step=2), 10), _params(), 3)
    frozen, _ = _train(optim.make_optimizer(_cfg(**common), 10), _params(), 3)
    for t in (1, 2):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), held[t]["head"], frozen[t]["head"])
    # Step 2 trains everything: the clip now spans the backbone too, so the head moves less.
    head_step = lambda h: np.abs(h[3]["head"]["kernel"] - h[2]["head"]["kernel"]).max()
    assert head_step(held) < head_step(frozen)
    assert not np.array_equal(held[3]["backbone"]["kernel"], _params()["backbone"]["kernel"])


def _first_update(cfg, params):
    tx = optim.make_optimizer(cfg, 10)
    updates, _ = tx.update(jax.grad(_loss)(params), tx.init(params), params)
    return updates


def test_lr_multipliers_scale_updates():
    params = _params()
    plain = _first_update(_cfg(name="sgd", lr=0.01), params)
    scaled = _first_update(_cfg(name="sgd", lr=0.01, lr_multipliers=(("^backbone/", 0.1),)), params)
    for name, factor in (("backbone", 0.1), ("head", 1.0)):
        for leaf in ("kernel", "bias"):
            np.testing.assert_allclose(scaled[name][leaf], factor * plain[name][leaf], rtol=1e-6)
    # With Adam the scaled group moves by about factor * lr per step, the others by about lr.
    adam = _first_update(_cfg(name="adam", lr=0.1, lr_multipliers=(("^backbone/", 0.1),)), params)
    np.testing.assert_allclose(adam["backbone"]["kernel"], 0.01, rtol=1e-4)
    np.testing.assert_allclose(adam["head"]["kernel"], 0.1, rtol=1e-4)


def test_lr_multipliers_and_unfreeze_config_errors():
    tx = optim.make_optimizer(_cfg(lr_multipliers=(("^backbnoe/", 0.1),)), 10)
    with pytest.raises(ValueError, match=r"lr_multipliers pattern '\^backbnoe/' matches no parameter"):
        tx.init(_params())
    with pytest.raises(ValueError, match="regex, factor >= 0"):
        optim.make_optimizer(_cfg(lr_multipliers=(("^backbone/", -1.0),)), 10)
    with pytest.raises(ValueError, match="unfreeze_at_step must be 0 when optim.freeze is empty"):
        optim.make_optimizer(_cfg(unfreeze_at_step=5), 10)


def test_load_into_reports_loaded_reinitialised_unused_and_renames():
    target = {"params": {"Conv_0": {"kernel": np.zeros((3, 3, 1, 8), np.float32)},
                         "Dense_0": {"kernel": nn.LogicallyPartitioned(np.zeros((4, 5), np.float32), ("a", "b"))},
                         "Dense_1": {"kernel": np.zeros((5, 3), np.float32)},
                         "new": {"bias": np.zeros((2,), np.float32)}}}
    source = {"params/Conv_0/kernel": np.ones((3, 3, 1, 8)), "params/Old_0/kernel": np.full((4, 5), 2.0),
              "params/Dense_1/kernel": np.ones((5, 10)), "params/extra/w": np.ones((1,))}
    out, report = transfer.load_into(target, source, rename=(("Old_0", "Dense_0"),), reinit=("Dense_1",))
    assert report.loaded == ["params/Conv_0/kernel", "params/Dense_0/kernel"]
    assert report.reinitialised == ["params/Dense_1/kernel", "params/new/bias"]
    assert report.unused == ["params/Dense_1/kernel", "params/extra/w"]
    assert isinstance(out["params"]["Dense_0"]["kernel"], nn.LogicallyPartitioned)  # boxes (logical axes) kept
    np.testing.assert_array_equal(out["params"]["Dense_0"]["kernel"].value, 2.0)
    np.testing.assert_array_equal(out["params"]["Dense_1"]["kernel"], 0.0)
    assert "re-initialised (2)" in str(report)
    with pytest.raises(transfer.ShapeMismatchError, match=r"params/Dense_1/kernel.*\(5, 3\).*\(5, 10\)"):
        transfer.load_into(target, source, rename=(("Old_0", "Dense_0"),))
    with pytest.raises(ValueError, match="init_reinit pattern 'Dnese' matches no target path"):
        transfer.load_into(target, source, reinit=("Dnese",))


def test_init_from_another_runs_checkpoint(tmp_path):
    """A 10-class CNN's checkpoint initialises a 5-class CNN: backbone loaded, new head fresh."""
    first = loop.train(cnn, tiny_config(**{"train.steps": 3}), str(tmp_path / "a"))
    source = transfer.read_checkpoint(str(tmp_path / "a"))
    assert set(source) == {f"params/{m}/{p}" for m in ("Conv_0", "Dense_0", "Dense_1") for p in ("kernel", "bias")}
    small = cnn.get_config("tiny")
    small.model.num_classes = 5
    transfer.add_config(small)
    small.init_from = str(tmp_path / "a")
    small.init_reinit = ("Dense_1",)
    variables = cnn.model(small).init(jax.random.key(3), jnp.zeros((1, 8, 8, 1)), train=False)
    loaded = transfer.init_from_config(small, nn.unbox(variables))
    jax.tree.map(np.testing.assert_array_equal, loaded["params"]["Conv_0"], first.state.params["Conv_0"])
    jax.tree.map(np.testing.assert_array_equal, loaded["params"]["Dense_1"], nn.unbox(variables)["params"]["Dense_1"])
    small.init_reinit = ()
    with pytest.raises(transfer.ShapeMismatchError, match=r"params/Dense_1/bias has shape \(5,\) in the model but \(10,\)"):
        transfer.init_from_config(small, nn.unbox(variables))
    with pytest.raises(FileNotFoundError, match="found no checkpoint"):
        transfer.read_checkpoint(str(tmp_path))
