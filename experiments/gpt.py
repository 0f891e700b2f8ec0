"""A GPT-style byte-level decoder LM on the Python standard library's source (offline) or tiny_shakespeare.

    python -m experiments.gpt                                        # offline stdlib text, a few minutes on 2 CPU cores
    python -m experiments.gpt --config=experiments/gpt.py:shakespeare  # nanoGPT's char model (needs tiny_shakespeare prepared)
    python -m experiments.gpt --config.parallel.mesh.data=2 --config.parallel.mesh.fsdp=4   # FSDP: a config change
    python -m experiments.gpt --config.init_from=gpt2/model.safetensors --config.lora.rank=8 ...
        # fine-tune Hugging Face GPT-2 weights with LoRA; the model keys must match the checkpoint
        # (jaxml.models.gpt2.model_kwargs: vocab 50257, norm_epsilon 1e-5, mlp_dim 4x, max_len <= 1024)

Expected (default: 4 layers, width 128, context 64, batch 32, 1000 steps, 2 shared CPU cores):
validation loss well below the unigram baseline of the corpus (about 3.05 nats/byte on
Python 3.11's stdlib); see the README table for the measured figure. The report writes
samples.txt (continuations of validation prompts, via jaxml.decoding) and perf.json
(tokens/s and MFU from the compiled step's FLOP count).
Reference for the :shakespeare preset: nanoGPT's 6-layer, 384-wide char model reaches
val loss 1.4697 nats/char on tiny_shakespeare after 5000 iterations (karpathy/nanoGPT README).
"""

import contextlib
import copy
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxml import config as config_lib
from jaxml import data, decoding, transfer
from jaxml.data import text
from jaxml.models import gpt2, lora, remat, transformer
from jaxml.train import log, optim, parallel
from jaxml.train.state import TrainState

LN2 = float(np.log(2.0))


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """Defaults for the offline stdlib run; presets: tiny (tests), shakespeare (nanoGPT's char model)."""
    c = config_lib.base_config()
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=text.VOCAB_SIZE,  # bytes
        num_layers=4,
        features=128,
        num_heads=4,
        num_kv_heads=ml_collections.config_dict.placeholder(int),  # None: plain multi-head attention
        mlp_dim=512,
        max_len=64,  # must cover the data's window (text_windows/<corpus>_<window>)
        dropout=0.0,  # 1000 steps see the 1.8 MB training text ~1.1 times: no overfitting to fight
        attention_dropout=0.0,
        tied_embedding=True,
        # False: 4 blocks unrolled run ~17% faster per step on CPU than a scanned stack and compile
        # as fast; True compiles one block and loops it, compile time flat in depth (32 layers: 6 s
        # vs 22 s unrolled), the choice for deep models (benchmarks/README "scaling").
        scan_layers=False,
        # Per block, which activations the backward pass keeps: none | full | dots_saveable |
        # dots_with_no_batch_dims_saveable (jaxml.models.remat); memory for recompute time
        # (unrolled layers on jax 0.10's CPU backend take a custom VJP: no forward mode through them).
        remat="none",
        use_fused=False,
        rope=False,
        norm_epsilon=1e-6,  # 1e-5 for GPT-2 weights (init_from a .safetensors file)
        dtype="float32",  # "bfloat16" on GPU/TPU
    ))
    # init_from: a jaxml workdir / checkpoint dir, or a Hugging Face GPT-2 .safetensors file (or its
    # directory); the model config must match it (jaxml.models.gpt2.model_kwargs gives GPT-2's).
    transfer.add_config(c)
    c.lora = lora.default_config()  # lora.rank > 0: train only adapters on lora.targets, the base frozen
    c.sample = ml_collections.ConfigDict(dict(num=4, prompt_lengths=(8, 16), length=64, temperature=0.8, top_k=0,
                                              top_p=0.95))
    c.data.name = "text_windows/pystdlib_64"
    c.data.eval_split = "validation"
    c.data.batch_size = 32  # shared/BASELINES.md's char GPT: 32 x 64 tokens per step
    c.data.eval_batch_size = 256
    c.optim.name = "adamw"
    c.optim.lr = 2e-3  # small model, short run: high lr with warmup and cosine decay
    c.optim.b2 = 0.99
    c.optim.schedule = "warmup_cosine"
    c.optim.warmup_steps = 100
    c.optim.end_lr_factor = 0.1
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0
    c.train.steps = 1000
    c.train.log_every = 50
    c.train.eval_every = 500
    c.checkpoint.every_steps = 500
    if preset is None or preset == "":
        return c
    if preset == "tiny":  # seconds on CPU, for tests
        c.model.update(dict(num_layers=2, features=32, num_heads=4, mlp_dim=64))
        c.sample.update(dict(num=2, length=24))
        c.data.batch_size = 16
        c.data.eval_split = "validation[:64]"
        c.data.eval_batch_size = 32
        c.optim.warmup_steps = 2
        c.train.steps, c.train.log_every, c.train.eval_every = 6, 2, 0
        c.checkpoint.every_steps = 3
    elif preset == "shakespeare":  # nanoGPT's config/train_shakespeare_char.py
        c.data.name = "text_windows/tiny_shakespeare_256"
        c.model.update(dict(num_layers=6, features=384, num_heads=6, mlp_dim=1536, max_len=256, dropout=0.2))
        c.sample.length = 256
        c.data.batch_size = 64
        c.optim.update(dict(lr=1e-3, warmup_steps=100, weight_decay=0.1, b2=0.99))
        c.train.steps, c.train.eval_every, c.checkpoint.every_steps = 5000, 500, 500
    else:
        raise ValueError(f"unknown preset {preset!r}; presets: tiny, shakespeare")
    return c


def model(config) -> transformer.DecoderLM:
    m = config.model
    remat.check(m.remat)  # an unknown policy fails here, while init is traced: before anything compiles
    return transformer.DecoderLM(
        vocab_size=m.vocab_size, num_layers=m.num_layers, features=m.features, num_heads=m.num_heads,
        mlp_dim=m.mlp_dim, max_len=m.max_len, num_kv_heads=m.num_kv_heads, dropout=m.dropout,
        attention_dropout=m.attention_dropout, tied_embedding=m.tied_embedding, scan_layers=m.scan_layers,
        remat=m.remat, use_fused=m.use_fused, rope=m.rope, norm_epsilon=m.norm_epsilon,
        dtype=config_lib.dtype(m.dtype))


def optim_config(config) -> ml_collections.ConfigDict:
    """config.optim, with the base model frozen when LoRA adapters are trained."""
    if not config.lora.rank:
        return config.optim
    cfg = copy.deepcopy(config.optim)
    cfg.unlock()
    cfg.freeze = tuple(cfg.freeze) + (lora.FREEZE_BASE,)
    return cfg


def _adapters(config, train: bool = False):
    """LoRA's interception when config.lora.rank > 0, else nothing."""
    return lora.adapters(config.lora, train=train) if config.lora.rank else contextlib.nullcontext()


def init_source(config):
    """The flat params the loop loads for config.init_from: GPT-2 weights mapped to jaxml paths for a
    .safetensors file (or a directory holding model.safetensors), None (a jaxml checkpoint) otherwise.
    LoRA adapters are in neither, so they keep their fresh (B = 0) initialisation."""
    path = config.init_from
    if path.endswith(".safetensors") or os.path.exists(os.path.join(path, "model.safetensors")):
        m = config.model
        return transfer.flatten(gpt2.import_params(path, num_heads=m.num_heads, scan_layers=m.scan_layers,
                                                   max_len=m.max_len))
    return None


def _split(batch):
    """Inputs and next-token targets from (B, L + 1) windows."""
    tokens_BxL1 = batch["tokens"].astype(jnp.int32)
    return tokens_BxL1[:, :-1], tokens_BxL1[:, 1:]


def _token_losses(logits_BxLxV, targets_BxL):
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)


def init(config, rng, batch) -> TrainState:
    inputs_BxL, _ = _split(batch)
    if inputs_BxL.shape[1] > config.model.max_len:
        raise ValueError(f"data {config.data.name} has windows of {inputs_BxL.shape[1]} tokens, longer than "
                         f"model.max_len={config.model.max_len}: raise max_len or pick a shorter window")
    with _adapters(config):
        params = model(config).init({"params": rng}, inputs_BxL)["params"]
    return TrainState.create(params, optim.make_optimizer(optim_config(config), config.train.steps))


def train_step(config, state: TrainState, batch, rng):
    inputs_BxL, targets_BxL = _split(batch)

    def loss_fn(params):
        with _adapters(config, train=True):
            logits = model(config).apply({"params": params}, inputs_BxL, train=True, rngs={"dropout": rng})
        return _token_losses(logits, targets_BxL).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grads = parallel.mean_over_devices(grads)
    new_state = state.apply_gradients(grads, optim.make_optimizer(optim_config(config), config.train.steps))
    return new_state, {"loss": loss, "bits_per_char": loss / LN2, "grad_norm": optax.tree.norm(grads),
                       "lr": optim.make_schedule(config.optim, config.train.steps)(state.step)}


def eval_step(config, state: TrainState, batch):
    inputs_BxL, targets_BxL = _split(batch)
    with _adapters(config):
        logits = model(config).apply({"params": state.params}, inputs_BxL)
    per_row_B = _token_losses(logits, targets_BxL).sum(-1) * batch["mask"]
    # Counted in tokens, so eval/loss is nats per byte (= per char for ASCII text).
    return {"loss": per_row_B.sum(), "bits_per_char": per_row_B.sum() / LN2,
            "count": batch["mask"].sum() * targets_BxL.shape[1]}


def flops_per_step(config, batch) -> float:
    """FLOPs of one compiled train step, from XLA's cost analysis.

    XLA counts a while-loop body once, not once per trip, so a scanned stack would be
    undercounted by about its depth: the count is taken on the unrolled layout (same math),
    from shapes only.
    """
    unrolled = copy.deepcopy(config)
    unrolled.model.scan_layers = False
    state = jax.eval_shape(lambda r: init(unrolled, r, batch), jax.random.key(0))
    step = jax.jit(lambda s, b, r: train_step(unrolled, s, b, r))
    cost = step.lower(state, batch, jax.random.key(0)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def measured_peak_flops(size: int = 1024, repeats: int = 5, min_seconds: float = 0.25) -> float:
    """This machine's float32 matmul throughput (FLOP/s): the CPU 'peak' that MFU is relative to.
    The fastest of at least `repeats` matmuls and of as many as `min_seconds` holds, so that a
    short busy spell of a shared host cannot set it (one of 5 back-to-back 10 ms matmuls read
    half the machine's speed once)."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best, done, start = float("inf"), 0, time.perf_counter()
    while done < repeats or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
        done += 1
    return 2 * size**3 / best


def report(config, state, workdir, eval_sums) -> None:
    """Writes samples.txt (continuations of validation prompts) and perf.json (loss vs unigram, tokens/s, MFU)."""
    dc, sc = config.data, config.sample
    val = data.load_source(dc.name, dc.eval_split, dc.data_dir, cache=True).arrays["tokens"]
    train_tokens = data.load_source(dc.name, dc.train_split, dc.data_dir, cache=True).arrays["tokens"]
    unigram = text.unigram_entropy_nats(val[:, 1:], train_tokens[:, 1:])
    # Prompts of different lengths in one batch: jaxml.decoding handles ragged rows.
    lengths = np.array([sc.prompt_lengths[i % len(sc.prompt_lengths)] for i in range(sc.num)])
    prompts = val[: sc.num, : max(lengths)].astype(np.int32)
    length = min(sc.length, config.model.max_len)
    params = state.params
    if config.lora.rank:  # sample from the merged weights; keep the adapters on their own (small)
        lora.save(os.path.join(workdir, "lora_adapters"), params)
        params = lora.merge(params, config.lora)
    out = decoding.generate(model(config), params, prompts, lengths, rng=jax.random.key(config.seed),
                            max_length=length, temperature=sc.temperature, top_k=sc.top_k, top_p=sc.top_p)
    samples = [f"--- prompt {text.decode(prompts[i, :lengths[i]])!r}\n{text.decode(out[i])}\n" for i in range(sc.num)]
    with open(os.path.join(workdir, "samples.txt"), "w") as f:
        f.write("\n".join(samples))

    rows = [r for r in log.read_metrics(workdir) if "perf/steps_per_sec" in r]
    steps_per_sec = float(np.median([r["perf/steps_per_sec"] for r in rows[1:]] or
                                    [r["perf/steps_per_sec"] for r in rows] or [float("nan")]))
    example = {"tokens": jnp.asarray(train_tokens[: dc.batch_size])}
    flops = flops_per_step(config, example)
    peak = measured_peak_flops()
    perf = {
        "eval_loss_nats_per_char": None if eval_sums is None else float(eval_sums["loss"]) / float(eval_sums["count"]),
        "unigram_nats_per_char": unigram,
        "tokens_per_sec": steps_per_sec * dc.batch_size * (val.shape[1] - 1),
        "flops_per_step": flops,
        "measured_peak_flops": peak,
        "mfu": steps_per_sec * flops / peak,
        "device": jax.devices()[0].device_kind,
    }
    with open(os.path.join(workdir, "perf.json"), "w") as f:
        json.dump(perf, f, indent=2)
    log.info("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in perf.items()))
    log.info("sample:\n" + samples[0])


if __name__ == "__main__":
    from jaxml import cli

    cli.main(sys.modules[__name__])
