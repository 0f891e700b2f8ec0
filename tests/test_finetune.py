"""experiments.finetune: class subsets, trainable-parameter counts, the tiny preset end to end."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


def test_cnn_experiment_starts_from_another_runs_checkpoint_by_config(tmp_path):
    """experiments.cnn --config.init_from: the backbone of a 10-class run, a fresh 5-class head."""
    first = loop.train(cnn, tiny_config(**{"train.steps": 3}), str(tmp_path / "a"))
    config = cnn.get_config("tiny")
    config.model.num_classes = 5
    config.init_from, config.init_reinit = str(tmp_path / "a"), ("Dense_1",)
    batch = {"image": jnp.zeros((2, 8, 8, 1), jnp.uint8)}
    params, source = nn.unbox(cnn.init(config, jax.random.key(3), batch).params), nn.unbox(first.state.params)
    jax.tree.map(np.testing.assert_array_equal, params["Conv_0"], source["Conv_0"])
    assert params["Dense_1"]["kernel"].shape[-1] == 5
    config.init_from = ""
    fresh = nn.unbox(cnn.init(config, jax.random.key(3), batch).params)
    assert not np.array_equal(fresh["Conv_0"]["kernel"], source["Conv_0"]["kernel"])
