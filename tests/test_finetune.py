"""experiments.finetune: class subsets, trainable-parameter counts, the tiny preset end to end."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import cnn, finetune
from jaxml import transfer
from jaxml.train import loop
from tests.test_engine import tiny_config


def test_class_subset_draws_shots_per_class_and_renumbers():
    arrays = {"image": np.arange(20 * 4, dtype=np.uint8).reshape(20, 2, 2, 1), "label": np.arange(20) % 10}
    x, y = finetune.class_subset(arrays, (5, 7), 2, np.random.default_rng(0))
    assert x.shape == (4, 2, 2, 1) and sorted(y.tolist()) == [0, 0, 1, 1]
    assert x.max() <= 1.0
    x_all, y_all = finetune.class_subset(arrays, (3,))
    assert len(y_all) == 2 and set(y_all.tolist()) == {0}


def test_finetune_tiny_prints_the_four_way_table(tmp_path):
    config = finetune.get_config("tiny")
    summary = finetune.run(config, str(tmp_path))
    methods = summary["methods"]
    assert list(methods) == list(finetune.METHODS)
    m = config.model
    flat = 4 * 4 * m.features[-1]  # one 2x pool of the 8x8 digits
    head = m.dense * 5 + 5
    assert methods["linear_probe"]["trainable_params"] == methods["random_probe"]["trainable_params"] == head
    assert methods["lora"]["trainable_params"] == head + config.lora.rank * (flat + m.dense)
    assert methods["finetune"]["trainable_params"] == methods["scratch"]["trainable_params"] == summary["model_params"]
    for r in methods.values():
        assert 0.0 <= r["accuracy_mean"] <= 1.0 and len(r["accuracies"]) == config.seeds
    assert json.loads((tmp_path / "results.json").read_text())["methods"].keys() == methods.keys()
    assert "| linear_probe |" in (tmp_path / "results.md").read_text()


def test_transfer_methods_start_from_the_pretrained_backbone_and_the_controls_do_not():
    config = finetune.get_config("tiny")
    source = finetune.model(config, len(config.source_classes))
    pretrained = transfer.flatten(finetune._init(source, jax.random.key(1), jnp.zeros((1, 8, 8, 1))))
    for method in finetune.METHODS:
        params, _, _ = finetune.method_setup(config, method, pretrained, jax.random.key(2))
        flat = transfer.flatten(params)
        backbone = [p for p in pretrained if not p.startswith(f"params/{finetune.HEAD}/")]
        assert backbone and all(p in flat for p in backbone)
        same = [np.array_equal(flat[p], pretrained[p]) for p in backbone]
        if method in ("scratch", "random_probe"):  # fresh kernels (biases start at zero either way)
            assert not any(s for p, s in zip(backbone, same) if p.endswith("kernel")), method
        else:
            assert all(same), method
        head = f"params/{finetune.HEAD}/kernel"
        assert not np.array_equal(flat[head], pretrained[head]), method  # new classes: a fresh head


@pytest.mark.slow  # three tiny CNN runs: ~40 CPU-s
def test_cnn_experiment_starts_from_another_runs_checkpoint_by_config(tmp_path):
    """experiments.cnn --config.init_from: the backbone of another run, a fresh head. The
    loop loads after init, into the placed state: with the conv channels split over 4 devices
    (jit) or one copy per device (pmap); the frozen backbone stays the source's bit for bit."""
    first = loop.train(cnn, tiny_config(**{"train.steps": 3}), str(tmp_path / "a"))
    source = jax.device_get(nn.unbox(first.state.params))
    for mode, mesh in (("jit", {"parallel.mesh.data": 2, "parallel.mesh.tensor": 4}), ("pmap", {})):
        result = loop.train(cnn, tiny_config(**{
            "train.steps": 3, "init_from": str(tmp_path / "a"), "init_reinit": ("Dense_1",),
            "optim.freeze": ("^Conv_",), "parallel.mode": mode, **mesh}), str(tmp_path / mode))
        params = result.state.params
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(params["Conv_0"]), source["Conv_0"])
        assert not np.array_equal(jax.device_get(params["Dense_1"]["kernel"]), source["Dense_1"]["kernel"])
        assert not np.array_equal(jax.device_get(params["Dense_0"]["kernel"]), source["Dense_0"]["kernel"])  # trained
        if mode == "jit":  # the loaded kernel lives where a fresh one would: output channels over the tensor axis
            assert params["Conv_0"]["kernel"].sharding.spec[-1] == "tensor"
