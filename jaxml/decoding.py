"""Autoregressive sampling with a KV cache: one jitted `lax.while_loop` (greedy, temperature, top-k, top-p).

Prompts of different lengths are batched right-padded: position t of row b is the prompt's
token while t < length_b, and sampled from the model after that. All rows share one
cache index, so no per-row positions are needed. The shortest prompt is fed in one
prefill call; the rest of the loop feeds one token per step.

`model` is any Linen module called as `model(tokens_BxL, *args, decode=True)` with
`method` (e.g. `EncoderDecoder.decode` with the encoded source in `args`), whose causal
self-attention keeps a "cache" collection (jaxml.models.attention.MultiHeadAttention).
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def filter_logits(logits_BxV: Float[Array, "B V"], top_k: int = 0, top_p: float = 1.0) -> Float[Array, "B V"]:
    """Logits with everything outside the top-k and outside the top-p nucleus set to -inf."""
    if top_k > 0:
        kth_B1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_B1, -jnp.inf, logits_BxV)
    if top_p < 1.0:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays while the mass before it is < top_p.
        before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        cutoff_B1 = jnp.min(jnp.where(before_BxV < top_p, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff_B1, -jnp.inf, logits_BxV)
    return logits_BxV


def sample_token(rng, logits_BxV, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Int[Array, "B"]:
    """One token per row: argmax when temperature == 0, else a draw from the filtered, tempered softmax."""
    if temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = filter_logits(logits_BxV.astype(jnp.float32) / temperature, top_k, top_p)
    return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


def init_cache(model: nn.Module, batch: int, max_length: int, *args, method: Callable | None = None) -> Any:
    """A zero KV cache sized for `max_length` positions (shapes only: no parameters are initialised)."""
    tokens = jnp.zeros((batch, max_length), jnp.int32)
    shapes = jax.eval_shape(functools.partial(model.init, decode=True, method=method), jax.random.key(0), tokens, *args)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


@functools.partial(jax.jit, static_argnames=("model", "max_length", "prefill", "temperature", "top_k", "top_p",
                                             "eos_id", "method"))
def _generate(model, params, prompt_BxT, lengths_B, rng, args, *, max_length, prefill, temperature, top_k, top_p,
              eos_id, method):
    batch = prompt_BxT.shape[0]
    cache = init_cache(model, batch, max_length, *args, method=method)

    def step(cache, tokens_BxL):
        logits, updates = model.apply({"params": params, "cache": cache}, tokens_BxL, *args, decode=True,
                                      method=method, mutable=["cache"])
        return updates["cache"], logits[:, -1]

    cache, logits_BxV = step(cache, prompt_BxT[:, :prefill])
    done_B = jnp.zeros((batch,), bool)

    def cond(carry):
        t, _, _, _, done_B = carry
        return (t < max_length) & ~jnp.all(done_B)

    def body(carry):
        t, cache, tokens_BxT, logits_BxV, done_B = carry
        sampled_B = sample_token(jax.random.fold_in(rng, t), logits_BxV, temperature, top_k, top_p)
        in_prompt_B = t < lengths_B
        token_B = jnp.where(in_prompt_B, tokens_BxT[:, t], jnp.where(done_B, 0, sampled_B))
        tokens_BxT = tokens_BxT.at[:, t].set(token_B)
        if eos_id is not None:
            done_B = done_B | (~in_prompt_B & (token_B == eos_id))
        cache, logits_BxV = step(cache, token_B[:, None])
        return t + 1, cache, tokens_BxT, logits_BxV, done_B

    tokens_BxT = jnp.zeros((batch, max_length), jnp.int32).at[:, :prompt_BxT.shape[1]].set(prompt_BxT)
    _, _, tokens_BxT, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(prefill), cache, tokens_BxT, logits_BxV, done_B))
    return tokens_BxT


def generate(model: nn.Module, params, prompt_BxP: Int[Array, "B P"], lengths_B: Int[Array, "B"] | None = None, *,
             rng: jax.Array, max_length: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: int | None = None, args: tuple = (), method: Callable | None = None) -> Int[Array, "B T"]:
    """Prompts (right-padded, true lengths `lengths_B`) continued to `max_length` tokens in total.

    Rows that emit `eos_id` stop early (zeros after it); the loop ends when all rows have.
    """
    prompt_BxP = jnp.asarray(prompt_BxP, jnp.int32)
    batch, width = prompt_BxP.shape
    lengths = jnp.full((batch,), width, jnp.int32) if lengths_B is None else jnp.asarray(lengths_B, jnp.int32)
    shortest = int(jnp.min(lengths))  # host value: it sets the static prefill length
    if not 1 <= shortest <= width <= max_length or int(jnp.max(lengths)) > width:
        raise ValueError(f"generate: prompt lengths must be in [1, prompt width {width}] and the width <= "
                         f"max_length={max_length}; got lengths {lengths.tolist()}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"generate: expected temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, "
                         f"{top_p}, {top_k}")
    return _generate(model, params, prompt_BxP, lengths, rng, tuple(args), max_length=max_length, prefill=shortest,
                     temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), eos_id=eos_id,
                     method=method)
