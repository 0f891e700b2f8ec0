"""ResNet: published parameter counts, BatchNorm train/eval behaviour, masked eval, and data parallelism on 8 devices."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import resnet as resnet_exp
from jaxml import data
from jaxml.models import resnet
from jaxml.train import parallel


def _param_count(model, image_shape) -> int:
    # eval_shape: ResNet-50's 25 M parameters are never materialised.
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), train=False))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(variables["params"])))


@pytest.mark.parametrize("model,image_shape,published", [
    # He et al. 2016 Table 6: 0.27 M. Exact count with option-A (zero-padding) shortcuts:
    # convs 432 + 6*2304 + 4608 + 5*9216 + 18432 + 5*36864, 19 BatchNorms (2 x channels), dense 64*10 + 10.
    (resnet.ResNet20(num_classes=10), (32, 32, 3), 269_722),
    (resnet.ResNet56(num_classes=10), (32, 32, 3), 853_018),  # Table 6: 0.85 M
    # torchvision's resnet18 / resnet34 / resnet50 (ImageNet, 1000 classes): 11.69 M, 21.80 M, 25.56 M.
    (resnet.ResNet18(num_classes=1000), (224, 224, 3), 11_689_512),
    (resnet.ResNet34(num_classes=1000), (224, 224, 3), 21_797_672),
    (resnet.ResNet50(num_classes=1000), (224, 224, 3), 25_557_032),
])
def test_parameter_counts_match_published(model, image_shape, published):
    assert _param_count(model, image_shape) == published


def test_bad_inputs_fail_with_the_shape():
    with pytest.raises(ValueError, match=r"expects \(batch, height, width, channels\).*\(2, 16, 16\)"):
        jax.eval_shape(functools.partial(resnet.Tiny(num_classes=3).init, train=False), jax.random.key(0),
                       jnp.ones((2, 16, 16)))
    with pytest.raises(ValueError, match=r"depth 6n \+ 2"):
        resnet._cifar(21)


def test_batchnorm_statistics_update_in_training_and_are_frozen_in_eval():
    # One downsampling block (both its BatchNorms and the zero-padding shortcut): quick to compile.
    model = resnet.BasicBlock(features=6, strides=2, shortcut="zero_pad")
    x = jax.random.normal(jax.random.key(1), (8, 16, 16, 4)) * 2 + 1
    # jit: eager Flax dispatches (and compiles) op by op, seconds for a ResNet on 8 fake devices.
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    y, updates = apply(variables, x, train=True, mutable=("batch_stats",))
    assert y.shape == (8, 8, 8, 6) and bool(jnp.isfinite(y).all())
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), variables["batch_stats"], updates["batch_stats"])
    assert all(jax.tree.leaves(moved))
    _, frozen = apply(variables, x, train=False, mutable=("batch_stats",))
    jax.tree.map(np.testing.assert_array_equal, variables["batch_stats"], frozen["batch_stats"])


def _tiny_config(data_dir):
    config = resnet_exp.get_config("tiny")
    config.data.data_dir = data_dir
    config.data.augment.crop_padding = 0  # per-device random crops differ under pmap; compare like with like
    return config


def test_eval_step_masks_padding(data_dir):
    config = _tiny_config(data_dir)
    test = data.load_source("digits", "test", data_dir, cache=True).arrays
    # Same shape twice (one compile): 5 real rows, then 3 masked rows, real once and junk once. Equal sums
    # also show eval uses running statistics: the masked rows do not move the real rows' outputs.
    real = {**{k: v[:8] for k, v in test.items()}, "mask": (np.arange(8) < 5).astype(np.float32)}
    padded = {k: v.copy() for k, v in real.items()}
    padded["image"][5:], padded["label"][5:] = 255, 9
    state = jax.jit(functools.partial(resnet_exp.init, config))(jax.random.key(0), real)
    evaluate = jax.jit(functools.partial(resnet_exp.eval_step, config))
    a, b = evaluate(state, real), evaluate(state, padded)
    assert float(b["count"]) == 5.0 and float(b["confusion"].sum()) == 5.0
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


def _train_on_8_devices(config, mode, steps=2):
    """(per-device BatchNorm statistics, plain final state) after `steps` steps under `mode`."""
    config.parallel.mode = mode
    source = data.load_source("digits", "train", config.data.data_dir, cache=True)
    batches = [source.gather(np.arange(i * 32, (i + 1) * 32)) for i in range(steps)]
    placement = parallel.setup(
        config.parallel, init_fn=functools.partial(resnet_exp.init, config),
        train_step=functools.partial(resnet_exp.train_step, config), eval_step=None,
        example_batch=batches[0], global_batch_size=32)
    state = placement.init(jax.random.key(0), batches[0])
    for batch in batches:
        state, _ = placement.train_step(state, placement.place_batch(batch), jax.random.key(1))
    per_device = jax.tree.map(lambda x: [np.asarray(s.data) for s in x.addressable_shards], state.batch_stats)
    return per_device, placement.plain_state(state)


@pytest.fixture(scope="module")
def trained_jit_and_pmap(data_dir):
    return {mode: _train_on_8_devices(_tiny_config(data_dir), mode) for mode in ("jit", "pmap")}


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_batchnorm_statistics_identical_on_all_8_devices(trained_jit_and_pmap, mode):
    per_device, plain = trained_jit_and_pmap[mode]
    for path, shards in jax.tree_util.tree_leaves_with_path(per_device, is_leaf=lambda x: isinstance(x, list)):
        assert len(shards) == 8, jax.tree_util.keystr(path)
        for shard in shards[1:]:
            np.testing.assert_array_equal(shards[0].squeeze(), shard.squeeze(), err_msg=jax.tree_util.keystr(path))
    # They moved away from the initial (0 mean, 1 var) statistics.
    assert not np.allclose(plain.batch_stats["BatchNorm_0"]["mean"], 0.0)


def test_pmap_equals_jit_with_batchnorm(trained_jit_and_pmap):
    (_, jit_state), (_, pmap_state) = trained_jit_and_pmap["jit"], trained_jit_and_pmap["pmap"]
    for tree in ("params", "batch_stats"):
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(getattr(jit_state, tree)),
                                jax.tree.leaves(getattr(pmap_state, tree))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5,
                                       err_msg=tree + jax.tree_util.keystr(path))


def test_select_relu_equals_relu_in_value_and_gradient():
    x = jnp.array([-2.0, -0.0, 0.0, 1e-30, 3.0])
    np.testing.assert_array_equal(resnet._relu(x), nn.relu(x))
    np.testing.assert_array_equal(jax.grad(lambda v: (resnet._relu(v) * jnp.arange(5.0)).sum())(x),
                                  jax.grad(lambda v: (nn.relu(v) * jnp.arange(5.0)).sum())(x))
    assert resnet._relu(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def _widest_forward_fusion(model) -> int:
    """How many convolution outputs the widest loop fusion of a training-mode forward pass reads."""
    x = jnp.ones((8, 32, 32, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    forward = jax.jit(lambda p: model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x, train=True,
                                            mutable=["batch_stats"])[0])
    hlo = forward.lower(variables["params"]).compile().as_text()
    fusions = [m.group(1) for m in re.finditer(r"= \S+ fusion\((.*?)\), kind=kLoop", hlo)]
    return max(len(re.findall(r"%(?:conv|ynn|convolution)", operands)) for operands in fusions)


def test_each_block_output_is_computed_once(monkeypatch):
    # Written as max(x, 0), XLA fused every earlier block's BatchNorm-add-relu into each block's
    # output through the identity skips (ResNet-20: one fusion read 8 convolutions' outputs), so
    # the residual stream was recomputed again and again; as a select each block reads its own.
    assert _widest_forward_fusion(resnet.ResNet20(num_classes=10)) <= 2
    monkeypatch.setattr(resnet, "_relu", nn.relu)
    assert _widest_forward_fusion(resnet.ResNet20(num_classes=10)) > 2  # the test can tell the difference
