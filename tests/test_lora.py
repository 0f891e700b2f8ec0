"""LoRA adapters: zero-B start, merge, training only the adapters, adapter-only checkpoints."""

import os

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxml import transfer
from jaxml.models import cnn, lora, transformer
from jaxml.train import optim


def _cfg(**kw):
    cfg = lora.default_config()
    cfg.update(dict(rank=4, alpha=8.0, targets=("attention/(query|value|out)$", "mlp_in$")), **kw)
    return cfg


def _dir_size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


@pytest.fixture(scope="module")
def lm():
    model = transformer.Tiny(vocab_size=64)
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
    base = nn.unbox(model.init(jax.random.key(1), tokens)["params"])
    with lora.adapters(_cfg()):
        fresh = nn.unbox(model.init(jax.random.key(2), tokens)["params"])
    # The pretrained base goes into the adapted model by path; the adapters are new.
    adapted, report = transfer.load_into({"params": fresh}, transfer.flatten(base))
    assert report.reinitialised and all(lora.is_adapter(p) for p in report.reinitialised) and not report.unused
    return model, tokens, base, adapted["params"]


def test_zero_b_leaves_outputs_unchanged_and_adapters_are_stacked(lm):
    model, tokens, base, adapted = lm
    attention = adapted["decoder"]["layers"]["block"]["attention"]
    assert attention["query"]["lora_a"].shape == (2, 32, 4)  # scanned: a leading layer axis
    assert attention["query"]["lora_b"].shape == (2, 4, 32)  # (rank, heads * head_dim)
    assert attention["out"]["lora_a"].shape == (2, 32, 4)  # out contracts (heads, head_dim)
    assert "lora_a" not in attention["key"]
    strip = lora.merge(adapted, _cfg())
    jax.tree.map(np.testing.assert_array_equal, strip, base)
    with lora.adapters(_cfg()):
        out = model.apply({"params": adapted}, tokens)
    np.testing.assert_array_equal(out, model.apply({"params": base}, tokens))
    assert lora.count(adapted) == 2 * 4 * (3 * (32 + 32) + (32 + 64))


def test_merged_equals_unmerged_after_training(lm):
    model, tokens, _, adapted = lm
    cfg = _cfg(dropout=0.1)
    ocfg = optim.default_config()
    ocfg.update(dict(lr=1e-2, freeze=(lora.FREEZE_BASE,)))
    tx = optim.make_optimizer(ocfg, 10)
    state = tx.init(adapted)
    # The frozen base has no optimizer state: only the adapters' moments.
    buffers = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    assert buffers == 2 * lora.count(adapted)

    def loss(params, rng):
        with lora.adapters(cfg, train=True):
            logits = model.apply({"params": params}, tokens, train=True, rngs={"dropout": rng})
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    @jax.jit
    def step(params, state, rng):
        value, grads = jax.value_and_grad(loss)(params, rng)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    params = adapted
    losses = []
    for i in range(5):
        params, state, value = step(params, state, jax.random.key(i))
        losses.append(float(value))
    assert losses[-1] < losses[0]
    for path, new, old in zip(jax.tree.leaves(optim.param_paths(params)), jax.tree.leaves(params),
                              jax.tree.leaves(adapted)):
        if lora.is_adapter(path) and path.endswith("lora_b"):
            assert not np.array_equal(new, old), path
        elif not lora.is_adapter(path):
            np.testing.assert_array_equal(new, old, err_msg=path)  # base bit-identical
    with lora.adapters(cfg):
        unmerged = model.apply({"params": params}, tokens)
    merged = model.apply({"params": lora.merge(params, cfg)}, tokens)
    assert not np.allclose(unmerged, model.apply({"params": lm[2]}, tokens), atol=1e-4)
    np.testing.assert_allclose(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_adapter_checkpoint_is_small_and_restores(lm, tmp_path):
    import orbax.checkpoint as ocp

    _, _, _, adapted = lm
    trained = jax.tree.map(lambda x: x + 0.5, adapted)
    lora.save(str(tmp_path / "adapters"), trained)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(str(tmp_path / "full"), trained)
    ckpt.wait_until_finished()
    assert _dir_size(tmp_path / "adapters") * 2 < _dir_size(tmp_path / "full")
    restored = lora.load(str(tmp_path / "adapters"), adapted)
    for path, new, want, old in zip(jax.tree.leaves(optim.param_paths(adapted)), jax.tree.leaves(restored),
                                    jax.tree.leaves(trained), jax.tree.leaves(adapted)):
        np.testing.assert_array_equal(new, want if lora.is_adapter(path) else old, err_msg=path)
    other = _cfg(rank=2)
    with lora.adapters(other):
        small = nn.unbox(lm[0].init(jax.random.key(1), lm[1])["params"])
    with pytest.raises(ValueError, match=r"shape mismatch.*saved \(2, 32, 4\), model \(2, 32, 2\)"):
        lora.load(str(tmp_path / "adapters"), small)


def test_dense_classifier_and_bad_targets():
    model = cnn.Tiny(num_classes=3)
    x = jnp.ones((2, 8, 8, 1))
    with lora.adapters(_cfg(targets=("Dense_0$",))):
        params = nn.unbox(model.init(jax.random.key(0), x, train=False)["params"])
    assert params["Dense_0"]["lora_a"].shape == (64, 4) and "lora_a" not in params["Dense_1"]
    with pytest.raises(ValueError, match=r"lora.targets \['Dnese'\] match no Dense layer.*Dense_0"):
        with lora.adapters(_cfg(targets=("Dnese",))):
            model.init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="lora.rank must be an int > 0"):
        with lora.adapters(_cfg(rank=0)):
            pass


@pytest.mark.slow  # ~25 s of CPU: an end-to-end run of experiments.gpt (compile of an LM with adapters)
def test_gpt_experiment_lora_finetunes_imported_gpt2_weights(tmp_path):
    """experiments.gpt with init_from a GPT-2 safetensors file and lora.rank: base loaded and frozen, adapters train."""
    import types

    pytest.importorskip("safetensors", reason="GPT-2 import reads safetensors (jaxml[hf])")
    from experiments import gpt
    from jaxml.models import gpt2
    from jaxml.train import loop

    config = gpt.get_config("tiny")
    config.model.norm_epsilon = 1e-5
    tokens = jnp.zeros((1, config.model.max_len), jnp.int32)
    pretrained = nn.unbox(gpt.model(config).init(jax.random.key(7), tokens)["params"])
    path = gpt2.export_params(pretrained, str(tmp_path / "gpt2"), num_heads=config.model.num_heads)
    config.init_from = path
    config.lora.update(dict(rank=2, targets=("attention/(query|value)$",)))
    config.train.steps, config.checkpoint.every_steps = 3, 3
    config.log.progress = False
    config.lock()
    lm = types.SimpleNamespace(**{**vars(gpt), "report": None})  # no samples / FLOP count: numbers only
    result = loop.train(lm, config, str(tmp_path / "run"))
    assert np.isfinite(result.eval_metrics["eval/loss"])
    params = jax.tree.map(np.asarray, result.state.params)
    trained_adapter = False
    for p, value in zip(jax.tree.leaves(optim.param_paths(params)), jax.tree.leaves(params)):
        if lora.is_adapter(p):
            trained_adapter |= p.endswith("lora_b") and bool(np.any(value != 0))
    assert trained_adapter
    # The GPT-2 weights were loaded and stayed fixed: merging the (trained) adapters out again gives them back.
    base = lora.merge(params, config.lora)
    np.testing.assert_array_equal(base["embed"]["token"]["embedding"], pretrained["embed"]["token"]["embedding"])
    flat_base, flat_pretrained = traverse_util.flatten_dict(base), traverse_util.flatten_dict(pretrained)
    mlp_kernels = [k for k in flat_pretrained if "mlp_in" in k and k[-1] == "kernel"]
    assert len(mlp_kernels) == config.model.num_layers or len(mlp_kernels) == 1  # unrolled, or one scanned stack
    for k in mlp_kernels:
        np.testing.assert_array_equal(flat_base[k], flat_pretrained[k])
