"""Linear models, the linear experiment's steps (standardisation, masking) and its match with scikit-learn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import linear as linear_exp
from jaxml import data
from jaxml.models import linear
from jaxml.train import loop


def test_shapes_and_zero_init():
    x = jnp.ones((4, 3))
    for model, shape in ((linear.LinearRegression(num_targets=2), (4, 2)), (linear.LogisticRegression(), (4,)),
                         (linear.SoftmaxRegression(num_classes=5), (4, 5))):
        variables = model.init(jax.random.key(0), x)
        out = model.apply(variables, x)
        assert out.shape == shape
        np.testing.assert_array_equal(out, 0.0)  # zero init: the start is seed-independent
    with pytest.raises(ValueError, match=r"expects \(batch, features\) .*, got shape \(4, 3, 1\)"):
        linear.LogisticRegression().init(jax.random.key(0), jnp.ones((4, 3, 1)))


def _config(preset, **overrides):
    config = linear_exp.get_config(preset)
    for k, v in overrides.items():
        node = config
        *path, leaf = k.split(".")
        for p in path:
            node = node[p]
        node[leaf] = v
    return config


@pytest.mark.parametrize("preset,label_key", [("tiny", "target"), ("tiny_breast_cancer", "label")])
def test_standardisation_from_train_split_and_padded_eval_batch(data_dir, preset, label_key):
    config = _config(preset, **{"data.data_dir": data_dir})
    train = data.load_source(config.data.name, "train", data_dir, cache=True).arrays
    test = data.load_source(config.data.name, "test", data_dir, cache=True).arrays
    batch = {k: v[:8] for k, v in test.items()}
    state = jax.jit(lambda b: linear_exp.init(config, jax.random.key(0), b))(batch)
    np.testing.assert_allclose(state.extra["feature_mean"], train["features"].mean(0), rtol=1e-5, atol=1e-6)
    # A few steps so the predictions are not all zero, then the same 5 rows with and without 3 junk padding rows.
    step = jax.jit(lambda s, b: linear_exp.train_step(config, s, b, None))
    for i in range(5):
        state, _ = step(state, {k: v[i * 32:(i + 1) * 32] for k, v in train.items()})
    real = {**{k: v[:5] for k, v in test.items()}, "mask": np.ones(5, np.float32)}
    padded = {k: np.concatenate([v, np.full_like(v[:3], 7)]) for k, v in real.items()}
    padded["mask"][5:] = 0.0
    evaluate = jax.jit(lambda s, b: linear_exp.eval_step(config, s, b))
    a, b = evaluate(state, real), evaluate(state, padded)
    assert float(b["count"]) == 5.0
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, err_msg=k)


@pytest.mark.parametrize("preset,ours,theirs,tolerance", [
    ("", "final/r2", "sklearn/r2", 0.01),
    ("breast_cancer", "final/accuracy", "sklearn/accuracy", 0.01),
])
def test_full_presets_match_sklearn(tmp_path, data_dir, preset, ours, theirs, tolerance):
    from jaxml.train import log

    # 600 of the 1500 steps already converge; progress off to keep the test log short.
    config = _config(preset, **{"data.data_dir": data_dir, "train.steps": 600, "train.eval_every": 0,
                                "checkpoint.every_steps": 600, "log.progress": False})
    loop.train(linear_exp, config, str(tmp_path))
    final = log.read_metrics(str(tmp_path))[-1]
    assert abs(final[ours] - final[theirs]) <= tolerance, final
