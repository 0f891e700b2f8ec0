"""KV-cache decoding: cached logits == full forward, greedy generation == naive re-run loop, sampling filters."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxml import decoding
from jaxml.models import transformer


@pytest.fixture(scope="module")
def lm():
    model = transformer.Tiny(vocab_size=40, num_kv_heads=2, rope=True)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 1, 40)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(1), tokens))["params"]
    return model, params, tokens


def test_cached_logits_equal_full_forward(lm):
    model, params, tokens = lm
    full = jax.jit(model.apply)({"params": params}, tokens)
    cache = decoding.init_cache(model, 2, 12)

    @jax.jit
    def step(cache, tokens_BxL):
        logits, updates = model.apply({"params": params, "cache": cache}, tokens_BxL, decode=True, mutable=["cache"])
        return updates["cache"], logits

    cache, first = step(cache, tokens[:, :5])  # prefill 5 positions, then one at a time
    pieces = [first] + [None] * 7
    for t in range(5, 12):
        cache, pieces[t - 4] = step(cache, tokens[:, t:t + 1])
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)


def test_greedy_generation_matches_naive_loop_with_ragged_prompts(lm):
    model, params, tokens = lm
    lengths = jnp.array([3, 6])
    prompt = jnp.where(jnp.arange(6)[None] < lengths[:, None], tokens[:, :6], 0)
    out = decoding.generate(model, params, prompt, lengths, rng=jax.random.key(0), max_length=12, temperature=0.0)
    apply = jax.jit(model.apply)
    for b in range(2):
        seq = list(np.asarray(prompt[b, :int(lengths[b])]))
        while len(seq) < 12:
            seq.append(int(jnp.argmax(apply({"params": params}, jnp.array([seq]))[0, -1])))
        np.testing.assert_array_equal(np.asarray(out[b]), seq)


def test_top_k_and_top_p_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    assert np.isfinite(decoding.filter_logits(logits, top_k=2)).sum() == 2
    assert np.isfinite(decoding.filter_logits(logits, top_p=0.7)).sum() == 2  # 0.5 + 0.3 reaches 0.7
    assert np.isfinite(decoding.filter_logits(logits, top_p=0.5)).sum() == 1
    draws = jax.vmap(lambda k: decoding.sample_token(k, logits, 1.0, top_k=2))(jax.random.split(jax.random.key(0), 200))
    assert set(np.unique(draws)) == {0, 1}


def test_sampling_is_reproducible_and_eos_stops(lm):
    model, params, tokens = lm
    gen = functools.partial(decoding.generate, model, params, tokens[:, :2], rng=jax.random.key(3), max_length=10,
                            temperature=1.0, top_p=0.9)
    np.testing.assert_array_equal(gen(), gen())
    first = gen()
    stopped = gen(eos_id=int(first[0, 2]))
    assert (np.asarray(stopped[0, 3:]) == 0).all()
