"""Diffusion U-Net throughput: training images/s, and sampling time per image, DDPM (1000 levels)
vs DDIM (50 steps).

    python -m benchmarks.generative [--batch 64] [--sample-batch 64] [--windows 3] [--steps 10]

The model is `experiments/diffusion.py`'s default U-Net on 8x8 digits-shaped inputs (random
data: throughput does not depend on the pixels). Times are medians of timed windows after a
warm-up (compile) call, each ended by block_until_ready. Measured on whatever backend JAX
picks; the numbers in the README are CPU (2 cores) only: GPU was not measured here.
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import diffusion as exp


def _median(fn, windows: int) -> float:
    times = []
    for _ in range(windows):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sample-batch", type=int, default=64)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="train steps per timed window")
    args = ap.parse_args()

    config = exp.get_config()
    config.data.batch_size = args.batch
    config.diffusion.num_steps = 1000  # DDPM's classic chain length, to compare with DDIM's 50
    config.diffusion.ddim_steps = 50
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (args.batch, 8, 8, 1), dtype=np.uint8),
             "label": rng.integers(0, 10, (args.batch,)), "mask": np.ones((args.batch,), np.float32)}
    state = jax.jit(functools.partial(exp.init, config))(jax.random.key(0), batch)
    step = jax.jit(functools.partial(exp.train_step, config), donate_argnums=(0,))

    t = time.perf_counter()
    state, metrics = step(state, batch, jax.random.key(1))
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t

    def window():
        nonlocal state
        for i in range(args.steps):
            state, m = step(state, batch, jax.random.key(i))
        return m

    train_s = _median(window, args.windows) / args.steps
    print(f"backend {jax.default_backend()} ({jax.device_count()} device(s)); U-Net "
          f"{sum(x.size for x in jax.tree.leaves(state.params)) / 1e6:.2f} M params")
    print(f"train: compile {compile_s:.1f} s, {train_s * 1e3:.1f} ms/step at batch {args.batch} = "
          f"{args.batch / train_s:.0f} images/s")

    labels = jnp.asarray(rng.integers(0, 10, (args.sample_batch,)), jnp.int32)
    for method, levels in (("ddim", config.diffusion.ddim_steps), ("ddpm", config.diffusion.num_steps)):
        # Guided sampling: two U-Net passes per level, as the experiment's report runs it.
        sampler = functools.partial(exp.sample, config, method=method, guidance=2.0)
        t = time.perf_counter()
        jax.block_until_ready(sampler(state.ema_params, jax.random.key(0), labels))
        compile_s = time.perf_counter() - t
        sample_s = _median(lambda: sampler(state.ema_params, jax.random.key(1), labels), max(1, args.windows - 2))
        print(f"sample {method.upper()} ({levels} steps, guided): compile {compile_s:.1f} s, "
              f"{sample_s / args.sample_batch * 1e3:.1f} ms/image at batch {args.sample_batch}")


if __name__ == "__main__":
    main()
