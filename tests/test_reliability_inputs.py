"""Bad input gets a clear error, good input a right-shaped answer: Hypothesis over model configs
and input shapes (CNN, MLP, GPT decoder) and over the engine's config values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from experiments import cnn as cnn_experiment
from jaxml import config as config_lib
from jaxml.models import cnn, mlp, transformer

FEW = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def output_of(model, x, **kwargs):
    """The shape and dtype of init + forward pass, traced but not compiled (compiling every drawn
    shape would take minutes; the model tests run real numbers for finiteness)."""
    return jax.eval_shape(lambda x: model.apply(model.init(jax.random.key(1), x, **kwargs), x, **kwargs), x)


@FEW
@given(batch=st.integers(1, 3), height=st.integers(4, 10), width=st.integers(4, 10), channels=st.integers(1, 3),
       features=st.lists(st.integers(1, 6), min_size=1, max_size=2), pool_first=st.booleans(),
       classes=st.integers(2, 5), one_d=st.booleans())
def test_cnn_any_valid_config_and_shape_gives_float32_logits(batch, height, width, channels, features, pool_first,
                                                            classes, one_d):
    model = cnn.CNN(num_classes=classes, features=tuple(features), pool_after=(0,) if pool_first else (),
                    dense=4, dropout=0.0)
    shape = (batch, height, channels) if one_d else (batch, height, width, channels)
    logits = output_of(model, jnp.zeros(shape), train=False)
    assert (logits.shape, logits.dtype) == ((batch, classes), jnp.float32)


@FEW
@given(rank=st.sampled_from([1, 2, 5]), size=st.integers(1, 4))
def test_cnn_wrong_rank_names_expected_and_got(rank, size):
    x = jnp.zeros((size,) * rank)
    with pytest.raises(ValueError, match=rf"expects \(batch, height, width, channels\).*got shape \({size},"):
        jax.eval_shape(lambda x: cnn.Tiny(num_classes=3).init(jax.random.key(0), x, train=False), x)


@FEW
@given(batch=st.integers(1, 4), features=st.integers(1, 12), widths=st.lists(st.integers(1, 8), max_size=3),
       norm=st.sampled_from(mlp.NORMS), outputs=st.integers(1, 4), bad_rank=st.sampled_from([1, 3, 4]))
def test_mlp_any_valid_config_and_wrong_rank(batch, features, widths, norm, outputs, bad_rank):
    model = mlp.MLP(num_outputs=outputs, widths=tuple(widths), norm=norm)
    out = output_of(model, jnp.zeros((batch, features)), train=False)
    assert out.shape == (batch, outputs)
    with pytest.raises(ValueError, match=r"MLP expects \(batch, features\) .*, got shape"):
        jax.eval_shape(lambda x: model.init(jax.random.key(1), x, train=False), jnp.zeros((2,) * bad_rank))


@settings(FEW, max_examples=5)  # tracing a transformer takes seconds on a busy CPU
@given(batch=st.integers(1, 3), heads=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([2, 4]),
       layers=st.integers(1, 2), max_len=st.integers(2, 12), data=st.data())
def test_decoder_lm_any_valid_config_too_long_and_float_input(batch, heads, head_dim, layers, max_len, data):
    length = data.draw(st.integers(1, max_len))
    model = transformer.DecoderLM(vocab_size=11, num_layers=layers, features=heads * head_dim, num_heads=heads,
                                  mlp_dim=8, max_len=max_len)
    tokens = jnp.zeros((batch, length), jnp.int32)
    logits = output_of(model, tokens)
    assert (logits.shape, logits.dtype) == ((batch, length, 11), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(1), tokens)  # errors come while tracing: no compile
    with pytest.raises(ValueError, match=rf"sequence length {max_len + 1} exceeds max_len={max_len}"):
        jax.eval_shape(model.apply, variables, jnp.zeros((batch, max_len + 1), jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        jax.eval_shape(model.apply, variables, tokens.astype(jnp.float32))


POSITIVE_INTS = ["train.steps", "train.log_every", "checkpoint.every_steps", "data.batch_size",
                 "data.eval_batch_size"]


def _set(config, key, value):
    node = config
    *path, leaf = key.split(".")
    for p in path:
        node = node[p]
    with node.ignore_type():
        node[leaf] = value


@FEW
@given(key=st.sampled_from(POSITIVE_INTS), value=st.integers(-10**6, 10**6))
def test_validate_accepts_exactly_the_positive_counts(key, value):
    config = cnn_experiment.get_config("tiny")
    _set(config, key, value)
    if value > 0:
        config_lib.validate(config)
    else:
        with pytest.raises(ValueError, match=rf"config.{key}={value} is invalid: expected"):
            config_lib.validate(config)


@FEW
@given(key=st.sampled_from(POSITIVE_INTS + ["optim.lr", "checkpoint.every_minutes", "seed"]),
       value=st.one_of(st.text(max_size=3), st.none(), st.lists(st.integers(), max_size=2), st.just(float("nan"))))
def test_validate_rejects_wrong_types_naming_the_key(key, value):
    if isinstance(value, float) and key in ("optim.lr", "checkpoint.every_minutes"):
        value = "nan"  # a float NaN is the right type; the string is not
    config = cnn_experiment.get_config("tiny")
    _set(config, key, value)
    with pytest.raises(ValueError, match=rf"config.{key}="):
        config_lib.validate(config)


@FEW
@given(lr=st.floats(allow_nan=True, allow_infinity=True))
def test_learning_rate_must_be_positive_and_finite(lr):
    config = cnn_experiment.get_config("tiny")
    config.optim.lr = lr
    if np.isfinite(lr) and lr > 0:
        config_lib.validate(config)
    else:
        with pytest.raises(ValueError, match="lr"):
            config_lib.validate(config)


def test_classifier_head_narrower_than_the_datasets_labels_is_refused_before_training(tmp_path):
    """model.num_classes=5 on the 10-class digits would give a NaN loss at step 1 (labels past the
    logits): the run refuses at init, naming both numbers, and writes no checkpoint."""
    from jaxml.train import loop
    from tests.test_engine import tiny_config

    with pytest.raises(ValueError, match=r"model.num_classes=5 but dataset 'digits' has 10 classes"):
        loop.train(cnn_experiment, tiny_config(**{"model.num_classes": 5}), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_unknown_remat_policy_is_rejected_by_validate_naming_the_choices():
    from experiments import gpt

    config = gpt.get_config("tiny")
    config.model.remat = "fast"
    with pytest.raises(ValueError, match=r"unknown remat policy 'fast'; expected one of none, full"):
        config_lib.validate(config)
    config.model.remat = "dots_saveable"
    config_lib.validate(config)
