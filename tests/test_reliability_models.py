"""Bad input to every public model, and to the engine's steps, gets a ValueError that names the
model (or the batch key), what it expects and what came; plus `train.skip_nonfinite_steps`
under pmap (its jit twin is in tests/test_reliability.py).

The models are only traced (jax.eval_shape): their checks run at trace time, so nothing here
compiles and each bad input costs milliseconds. Good inputs of the same models run in the
per-model tests (test_cnn_model.py, test_transformer.py, ...).
"""

import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from experiments import cnn as cnn_experiment
from jaxml import data as data_lib
from jaxml.models import (attention, autoencoder, cnn, gan, gpt2, inception, linear, lora, mlp, resnet, rnn,
                          transformer, unet, vit)
from jaxml.train import loop
from tests.test_engine import assert_trees_close, params_of, tiny_config
from tests.test_reliability import CONSTANT_LR, poisoned

FEW = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
F32, I32 = jnp.float32, jnp.int32


def S(shape, dtype=F32):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def rejected(model, *args, method=None, **kwargs) -> str:
    """The message of the ValueError that tracing `model.init(rng, *args)` raises (args: ShapeDtypeStructs or None)."""
    with pytest.raises(ValueError) as info:
        jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a, method=method, **kwargs), *args)
    return str(info.value)


def assert_names(message, model, expects, bad):
    """`message` names the model, the expected layout and the shape and dtype that came."""
    got = f"got shape {tuple(bad.shape)} {jnp.dtype(bad.dtype).name}"
    assert message.startswith(f"{model} expects "), message
    assert expects in message and got in message, (message, expects, got)


# ---- every public model: one wrong rank and one wrong dtype (at least) ------------------------

TOKENS_LM = transformer.DecoderLM(vocab_size=11, num_layers=1, features=8, num_heads=2, mlp_dim=8, max_len=8)
GPT2_CONFIG = {"model_type": "gpt2", "vocab_size": 11, "n_layer": 1, "n_embd": 8, "n_head": 2, "n_positions": 8}
SEQ2SEQ = transformer.EncoderDecoder(vocab_size=11, num_layers=1, features=8, num_heads=2, mlp_dim=8, max_len=8)
ENCODER = transformer.Encoder(vocab_size=11, num_layers=1, features=8, num_heads=2, mlp_dim=8, max_len=8)
IMAGE = "(batch, height, width, channels)"

# (id, model, args, kwargs, the index of the bad arg, the expected layout in the message)
CASES = [
    ("linear-rank", linear.LinearRegression(), (S((4, 3, 1)),), {}, 0, "(batch, features) real-valued"),
    ("linear-bool", linear.LinearRegression(), (S((4, 3), bool),), {}, 0, "(batch, features) real-valued"),
    ("logistic-rank", linear.LogisticRegression(), (S((4,)),), {}, 0, "(batch, features)"),
    ("logistic-bool", linear.LogisticRegression(), (S((4, 3), bool),), {}, 0, "(batch, features) real-valued"),
    ("softmax-rank", linear.SoftmaxRegression(3), (S((4, 3, 2)),), {}, 0, "(batch, features)"),
    ("softmax-complex", linear.SoftmaxRegression(3), (S((4, 3), jnp.complex64),), {}, 0, "(batch, features)"),
    ("mlp-rank", mlp.Tiny(3), (S((2, 8, 8, 1)),), {"train": False}, 0, "(batch, features) real-valued"),
    ("mlp-bool", mlp.Tiny(3), (S((2, 8), bool),), {"train": False}, 0, "(batch, features) real-valued"),
    ("cnn-rank", cnn.Tiny(3), (S((2, 8)),), {"train": False}, 0, f"{IMAGE} or (batch, time, channels) float"),
    ("cnn-uint8", cnn.Tiny(3), (S((2, 8, 8, 1), jnp.uint8),), {"train": False}, 0, f"{IMAGE} or"),
    ("resnet-rank", resnet.Tiny(3), (S((3, 32, 32)),), {"train": False}, 0, f"{IMAGE} float images"),
    ("resnet-int", resnet.Tiny(3), (S((3, 32, 32, 3), I32),), {"train": False}, 0, f"{IMAGE} float images"),
    ("vit-rank", vit.Tiny(3), (S((2, 8, 8)),), {}, 0, f"{IMAGE} float images"),
    ("vit-uint8", vit.Tiny(3), (S((2, 8, 8, 1), jnp.uint8),), {}, 0, f"{IMAGE} float images"),
    ("lstm-rank", rnn.RNNStack("lstm", 4), (S((2, 5)),), {}, 0, "(batch, time, features) float"),
    ("gru-int", rnn.RNNStack("gru", 4), (S((2, 5, 3), I32),), {}, 0, "(batch, time, features) float"),
    ("lstm-lengths-batch", rnn.RNNStack("lstm", 4), (S((2, 5, 3)), S((3,), I32)), {}, 1, "(batch=2,) integer lengths"),
    ("lstm-lengths-float", rnn.RNNStack("lstm", 4), (S((2, 5, 3)), S((2,))), {}, 1, "(batch=2,) integer lengths"),
    ("charlm-rank", rnn.TinyLM(11), (S((5,), I32),), {}, 0, "(batch, time) integer tokens"),
    ("charlm-float", rnn.TinyLM(11), (S((2, 5)),), {}, 0, "(batch, time) integer tokens"),
    ("classifier-tokens-rank", rnn.TinyClassifier(2, vocab_size=11), (S((2, 5, 1), I32),), {}, 0,
     "(batch, time) integer tokens"),
    ("classifier-tokens-float", rnn.TinyClassifier(2, vocab_size=11), (S((2, 5)),), {}, 0, "integer tokens"),
    ("classifier-signals-int", rnn.TinyClassifier(2), (S((2, 5, 3), I32),), {}, 0,
     "(batch, time, channels) float signals"),
    ("classifier-lengths", rnn.TinyClassifier(2, vocab_size=11), (S((2, 5), I32), S((2, 1), I32)), {}, 1,
     "(batch=2,) integer lengths"),
    ("attention-rank", attention.MultiHeadAttention(2), (S((2, 8)),), {}, 0, "(batch, length, features) float"),
    ("attention-int", attention.MultiHeadAttention(2), (S((2, 4, 8), I32),), {}, 0, "(batch, length, features)"),
    ("attention-context-batch", attention.MultiHeadAttention(2), (S((2, 4, 8)), S((3, 5, 6))), {}, 1,
     "(batch=2, source, features) float context"),
    ("attention-mask-float", attention.MultiHeadAttention(2), (S((2, 4, 8)), None, S((2, 4, 4))), {}, 2,
     "(batch=2, length=4, source=4) boolean mask"),
    ("attention-mask-shape", attention.MultiHeadAttention(2), (S((2, 4, 8)), None, S((2, 4, 5), bool)), {}, 2,
     "(batch=2, length=4, source=4) boolean mask"),
    ("block-rank", transformer.TransformerBlock(2, 8), (S((4, 8)),), {}, 0, "(batch, length, features)"),
    ("block-int", transformer.TransformerBlock(2, 8), (S((2, 4, 8), I32),), {}, 0, "(batch, length, features) float"),
    ("decoder-lm-rank", TOKENS_LM, (S((5,), I32),), {}, 0, "(batch, length) integer tokens"),
    ("decoder-lm-float", TOKENS_LM, (S((2, 5)),), {}, 0, "(batch, length) integer tokens"),
    ("gpt2-rank", transformer.DecoderLM(**gpt2.model_kwargs(GPT2_CONFIG)), (S((2, 5, 1), I32),), {}, 0,
     "(batch, length) integer tokens"),
    ("encoder-rank", ENCODER, (S((2, 5, 1), I32),), {}, 0, "(batch, source) integer tokens"),
    ("encoder-float", ENCODER, (S((2, 5), jnp.bfloat16),), {}, 0, "(batch, source) integer tokens"),
    ("encoder-valid-shape", ENCODER, (S((2, 5), I32), S((2, 4), bool)), {}, 1, "(batch=2, source=5) boolean"),
    ("encoder-valid-int", ENCODER, (S((2, 5), I32), S((2, 5), I32)), {}, 1, "(batch=2, source=5) boolean"),
    ("seq2seq-source-rank", SEQ2SEQ, (S((5,), I32), S((2, 4), I32)), {}, 0, "(batch, source) integer source"),
    ("seq2seq-target-float", SEQ2SEQ, (S((2, 5), I32), S((2, 4))), {}, 1, "(batch=2, length) integer target"),
    ("seq2seq-target-batch", SEQ2SEQ, (S((2, 5), I32), S((3, 4), I32)), {}, 1, "(batch=2, length) integer target"),
    ("seq2seq-decode-width", SEQ2SEQ, (S((2, 4), I32), S((2, 5, 6))), {"method": "decode"}, 1,
     "(batch=2, source, features=8) float encoded source"),
    ("seq2seq-decode-valid", SEQ2SEQ, (S((2, 4), I32), S((2, 5, 8)), S((2, 5), I32)), {"method": "decode"}, 2,
     "(batch=2, source=5) boolean source valid mask"),
    ("mlp-ae-rank", autoencoder.TinyMLP((8, 8, 1)), (S((2, 64)),), {}, 0, f"{IMAGE} float images"),
    ("mlp-ae-uint8", autoencoder.TinyMLP((8, 8, 1)), (S((2, 8, 8, 1), jnp.uint8),), {}, 0, f"{IMAGE} float"),
    ("conv-ae-rank", autoencoder.conv_autoencoder((8, 8, 1), (4,), 2), (S((8, 8, 1)),), {}, 0, f"{IMAGE} float"),
    ("conv-ae-decode-rank", autoencoder.conv_autoencoder((8, 8, 1), (4,), 2), (S((2, 2, 1)),), {"method": "decode"},
     0, "(batch, latent) float latents"),
    ("spatial-ae-decode-rank", autoencoder.conv_autoencoder((8, 8, 1), (4,), 2, spatial=True), (S((2, 2)),),
     {"method": "decode"}, 0, f"{IMAGE} float latents"),
    ("vae-int", autoencoder.mlp_vae((8, 8, 1), (8,), 2), (None, S((2, 8, 8, 1), I32)), {}, 1, f"{IMAGE} float"),
    ("vae-rank", autoencoder.mlp_vae((8, 8, 1), (8,), 2), (None, S((2, 64))), {}, 1, f"{IMAGE} float"),
    ("generator-rank", gan.TinyGenerator((8, 8, 1)), (S((2, 4, 1, 1)),), {"train": False}, 0,
     "(batch, latent) float latents"),
    ("generator-int", gan.TinyGenerator((8, 8, 1)), (S((2, 4), I32),), {"train": False}, 0, "(batch, latent) float"),
    ("discriminator-rank", gan.TinyDiscriminator(), (S((2, 8, 8)),), {}, 0, f"{IMAGE} float images"),
    ("discriminator-uint8", gan.TinyDiscriminator(), (S((2, 8, 8, 1), jnp.uint8),), {}, 0, f"{IMAGE} float images"),
    ("unet-rank", unet.Tiny(), (S((2, 8, 8)), S((2,), I32)), {}, 0, f"{IMAGE} float images"),
    ("unet-int", unet.Tiny(), (S((2, 8, 8, 1), jnp.uint8), S((2,), I32)), {}, 0, f"{IMAGE} float images"),
    ("unet-t-batch", unet.Tiny(), (S((2, 8, 8, 1)), S((3,), I32)), {}, 1, "(batch=2,) real-valued noise levels t"),
    ("unet-t-rank", unet.Tiny(), (S((2, 8, 8, 1)), S((2, 1), I32)), {}, 1, "(batch=2,) real-valued noise levels"),
    ("unet-labels-float", unet.Tiny(num_classes=3), (S((2, 8, 8, 1)), S((2,), I32), S((2,))), {}, 2,
     "(batch=2,) integer class labels"),
    ("unet-context-dim", unet.Tiny(context_dim=5), (S((2, 8, 8, 1)), S((2,), I32), None, S((2, 3, 4))), {}, 3,
     "(batch=2, positions, context_dim=5) float context"),
    ("unet-context-batch", unet.Tiny(context_dim=5), (S((2, 8, 8, 1)), S((2,), I32), None, S((1, 3, 5))), {}, 3,
     "(batch=2, positions, context_dim=5) float context"),
    ("inception-rank", inception.FIDInceptionV3(), (S((32, 32, 3)),), {}, 0, "channels=3) float RGB images"),
    ("inception-gray", inception.FIDInceptionV3(), (S((2, 32, 32, 1)),), {}, 0,
     "(batch, height, width, channels=3) float RGB images"),
    ("inception-uint8", inception.FIDInceptionV3(), (S((2, 32, 32, 3), jnp.uint8),), {}, 0, "channels=3) float"),
]


# Autoencoders and VAEs are pairs of public modules: the encoder or decoder that got the input names itself.
PART = {"mlp-ae-rank": "MLPEncoder", "mlp-ae-uint8": "MLPEncoder", "conv-ae-rank": "ConvEncoder",
        "conv-ae-decode-rank": "ConvDecoder", "spatial-ae-decode-rank": "ConvDecoder", "vae-int": "MLPEncoder",
        "vae-rank": "MLPEncoder"}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_names_model_expected_and_got(case):
    case_id, model, args, kwargs, bad, expects = case
    if "method" in kwargs:
        kwargs = {**kwargs, "method": getattr(type(model), kwargs["method"])}
    if isinstance(model, autoencoder.VAE):  # VAE(rng, x): the rng is an argument, not traced here
        message = rejected(model, jax.random.key(1), *args[1:], **kwargs)
    else:
        message = rejected(model, *args, **kwargs)
    assert_names(message, PART.get(case_id, type(model).__name__), expects, args[bad])


def test_every_public_model_module_is_covered():
    """A new model file gets a bad-input case here (or says why it has no inputs of its own)."""
    covered = {type(c[1]).__module__ for c in CASES}
    # gpt2 builds DecoderLMs (covered by its case); lora wraps any model (test below); conv is the
    # convolution function nn.Conv calls, with the kernel nn.Conv shapes from the input (ResNet's cases);
    # dense is nn.Dense (any rank) with a matmul whose mismatched shapes are named in tests/test_dense.py;
    # norm is flax's BatchNorm (any rank, features last), whose parameter-shape errors are flax's own.
    without_own_inputs = {"jaxml.models.gpt2", "jaxml.models.lora", "jaxml.models.remat", "jaxml.models.conv",
                          "jaxml.models.dense", "jaxml.models.norm"}
    import pkgutil

    import jaxml.models
    public = {f"jaxml.models.{m.name}" for m in pkgutil.iter_modules(jaxml.models.__path__) if not m.name.startswith("_")}
    assert public - without_own_inputs <= covered, public - without_own_inputs - covered


def test_decoder_lm_rank_one_tokens_no_longer_raise_index_error():
    # It used to fail with a bare IndexError inside the embedding (tokens.shape[1]).
    message = rejected(TOKENS_LM, S((7,), I32))
    assert message == "DecoderLM expects (batch, length) integer tokens, got shape (7,) int32"


def test_lora_adapted_model_keeps_the_models_input_check():
    cfg = lora.default_config()
    cfg.rank = 2
    with lora.adapters(cfg):
        message = rejected(TOKENS_LM, S((2, 5)))
    assert_names(message, "DecoderLM", "(batch, length) integer tokens", S((2, 5)))


def test_hint_says_how_to_fix_integer_images_and_float_tokens():
    assert "x / 255" in rejected(resnet.Tiny(3), S((2, 8, 8, 3), jnp.uint8), train=False)
    assert "astype(jnp.int32)" in rejected(TOKENS_LM, S((2, 5)))


IMAGE_MODELS = {
    "CNN": (cnn.Tiny(3), {"train": False}),
    "ResNet": (resnet.Tiny(3), {"train": False}),
    "ViT": (vit.Tiny(3), {}),
    "Discriminator": (gan.TinyDiscriminator(), {}),
    "MLPEncoder": (autoencoder.MLPEncoder((4,), 2), {}),
    "ConvEncoder": (autoencoder.ConvEncoder((4,), 2), {}),
}
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32, jnp.uint8, jnp.int8, jnp.bool_]


@FEW
@given(name=st.sampled_from(sorted(IMAGE_MODELS)), rank=st.integers(1, 6), dtype=st.sampled_from(DTYPES),
       size=st.integers(1, 4))
def test_image_models_reject_any_bad_rank_or_dtype(name, rank, dtype, size):
    model, kwargs = IMAGE_MODELS[name]
    good_rank = rank == 4 or (name == "CNN" and rank == 3)
    assume(not (good_rank and jnp.issubdtype(dtype, jnp.floating)))
    x = S((size,) * rank, dtype)
    assert_names(rejected(model, x, **kwargs), name, IMAGE, x)


TOKEN_MODELS = {
    "DecoderLM": TOKENS_LM,
    "Encoder": ENCODER,
    "CharRNNLM": rnn.TinyLM(11),
    "RNNClassifier": rnn.TinyClassifier(2, vocab_size=11),
}


@FEW
@given(name=st.sampled_from(sorted(TOKEN_MODELS)), rank=st.integers(1, 4), dtype=st.sampled_from(DTYPES),
       size=st.integers(1, 4))
def test_token_models_reject_any_bad_rank_or_dtype(name, rank, dtype, size):
    assume(not (rank == 2 and jnp.issubdtype(dtype, jnp.integer)))
    x = S((size,) * rank, dtype)
    assert_names(rejected(TOKEN_MODELS[name], x), name, "integer", x)


# ---- the engine: batches that differ from the ones the steps were compiled for ------------------

def digits(split):
    data = cnn_experiment.get_config("tiny").data
    return data_lib.load_source(data.name, split, data_dir=data.data_dir, cache=True)


@pytest.fixture(scope="module")
def first_train_batch():
    return next(iter(data_lib.train_dataset(digits("train"), global_batch_size=16, seed=0)))


def test_train_batch_check_names_key_expected_and_got(first_train_batch):
    batch = first_train_batch
    spec = loop.BatchSpec("train", batch)
    assert spec.check({k: v.copy() for k, v in batch.items()}) is not None  # same structure: passes
    image, label = batch["image"], batch["label"]
    shape = tuple(image.shape)
    bad_dtype = {**batch, "image": image.astype(np.float32)}
    with pytest.raises(ValueError, match=re.escape(f"['image']: expected shape {shape} uint8, got shape {shape} float32")):
        spec.check(bad_dtype)
    bad_shape = {**batch, "image": image[:-1]}
    with pytest.raises(ValueError, match=re.escape(f"got shape {(shape[0] - 1,) + shape[1:]} uint8")):
        spec.check(bad_shape)
    with pytest.raises(ValueError, match=re.escape(f"['label']: expected shape {label.shape} {label.dtype}, got no such key")):
        spec.check({"image": image})
    with pytest.raises(ValueError, match=re.escape("['extra']: expected no such key, got shape (2,) int64")):
        spec.check({**batch, "extra": np.zeros(2, np.int64)})


def test_eval_spec_is_its_own_and_padded_last_batch_passes(first_train_batch):
    # Eval batches are padded (with a mask) to one shape, which may differ from the train batch's.
    batches = list(data_lib.eval_batches(digits("test"), global_batch_size=7))
    assert batches[-1]["mask"].min() == 0  # the digits test split does not divide by 7: the last one is padded
    spec = loop.BatchSpec("eval")
    for b in batches:
        spec.check(b)
    with pytest.raises(ValueError, match=r"this eval batch differs.*\['mask'\]: expected shape \(7,\) float32, got no such key"):
        spec.check(first_train_batch)


def test_run_stops_before_the_step_on_a_batch_of_another_dtype(tmp_path, monkeypatch):
    # The pipeline starts serving float32 images while the step was compiled for the uint8 first batch.
    real = data_lib.train_dataset
    calls = []

    def train_dataset(*args, **kwargs):
        calls.append(1)
        ds = real(*args, **kwargs)
        return ds.map(lambda b: {**b, "image": b["image"].astype(np.float32)}) if len(calls) == 1 else ds

    monkeypatch.setattr(data_lib, "train_dataset", train_dataset)
    with pytest.raises(ValueError, match=r"this train batch differs from the first one, which the train step was compiled for: "
                                         r"\['image'\]: expected shape \(\d+, 8, 8, 1\) uint8, got shape "
                                         r"\(\d+, 8, 8, 1\) float32"):
        loop.train(cnn_experiment, tiny_config(**{"train.steps": 2, **CONSTANT_LR}), str(tmp_path))


# ---- skipping non-finite steps under pmap ----------------------------------------------------

def without_eval(experiment):
    """`experiment` with no eval_step and report: the runs below compare params, and pmap's eval compiles slowly."""
    module = types.ModuleType(f"{experiment.__name__}_no_eval")
    for name in loop.EXPERIMENT_FUNCTIONS:
        setattr(module, name, getattr(experiment, name))
    module.eval_step = module.report = None
    return module


def test_skipped_nan_step_under_pmap_discards_its_update(tmp_path, capsys):
    # As tests/test_reliability.py's jit version: state.step 5 sees a NaN batch, one skip allowed,
    # so the 6-step run ends with exactly the state of a 5-step run of the same step (constant lr).
    pmap = {"parallel.mode": "pmap", "train.skip_nonfinite_steps": 1, **CONSTANT_LR}
    skipped = loop.train(without_eval(poisoned(cnn_experiment, [5])), tiny_config(**{"train.steps": 6, **pmap}),
                         str(tmp_path / "skip"))
    assert "non-finite training metrics at step 6" in capsys.readouterr().out
    five = loop.train(without_eval(cnn_experiment), tiny_config(**{"train.steps": 5, **pmap}), str(tmp_path / "five"))
    assert "non-finite" not in capsys.readouterr().out
    assert skipped.step == 6
    assert_trees_close(params_of(five), params_of(skipped), rtol=0, atol=0)
    assert_trees_close(five.state.opt_state, skipped.state.opt_state, rtol=0, atol=0)
