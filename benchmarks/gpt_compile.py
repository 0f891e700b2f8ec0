"""GPT train step: compile time vs depth (scanned layers vs unrolled), tokens/s and MFU from XLA's FLOP count.

    python -m benchmarks.gpt_compile [--depths 2 8 32] [--steps 10] [--device cpu|gpu]

For each depth and layer layout it builds experiments.gpt's model (width 128, 4 heads,
context 64, batch 32 -- shared/BASELINES.md's char GPT) and times: lower + compile of the
train step (value_and_grad + AdamW), then the median step time over `--steps` steps.
FLOPs per step come from the compiled step's `cost_analysis()` (of the unrolled layout:
XLA counts a loop body once); MFU is relative to the
measured float32 matmul throughput of this machine (CPU) -- a peak you can reach, not a
datasheet number. `--device gpu` runs a GPT-2 small (124M) config in bfloat16 instead and
takes MFU against the datasheet bf16 peak given by --peak_tflops.
Expected: scanned compile time nearly flat in depth, unrolled growing about linearly.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import gpt


def _config(depth: int, scan: bool, device: str):
    c = gpt.get_config()
    c.model.num_layers, c.model.scan_layers = depth, scan
    if device == "gpu":  # GPT-2 small: 124M params, context 1024, bf16 compute
        c.model.update(dict(vocab_size=50304, features=768, num_heads=12, mlp_dim=3072, max_len=1024, dtype="bfloat16",
                            use_fused=True))
        c.data.batch_size = 8
    return c


def bench(depth: int, scan: bool, steps: int, device: str, peak: float) -> dict:
    c = _config(depth, scan, device)
    length = c.model.max_len
    tokens = np.random.default_rng(0).integers(0, c.model.vocab_size, (c.data.batch_size, length + 1), dtype=np.int32)
    batch = {"tokens": jnp.asarray(tokens)}
    state = jax.jit(lambda r: gpt.init(c, r, batch))(jax.random.key(0))
    step = jax.jit(lambda s, b, r: gpt.train_step(c, s, b, r), donate_argnums=(0,))
    t = time.perf_counter()
    compiled = step.lower(state, batch, jax.random.key(1)).compile()
    compile_s = time.perf_counter() - t
    flops = gpt.flops_per_step(c, batch)  # counted unrolled: XLA counts a scan body once
    state, m = compiled(state, batch, jax.random.key(1))  # warm-up
    jax.block_until_ready(m)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        state, m = compiled(state, batch, jax.random.key(i))
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    return dict(depth=depth, layout="scan" if scan else "unrolled", compile_s=compile_s, step_ms=1e3 * step_s,
                tokens_per_s=c.data.batch_size * length / step_s, gflops_per_step=flops / 1e9,
                mfu=flops / step_s / peak)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="GPU bf16 dense peak (H100 SXM: 989)")
    parser.add_argument("--skip_unrolled_above", type=int, default=32, help="unrolled compiles grow with depth")
    args = parser.parse_args()
    if args.device == "gpu" and jax.default_backend() != "gpu":
        raise SystemExit(f"--device gpu asked for, but JAX's backend is {jax.default_backend()!r}")
    peak = args.peak_tflops * 1e12 if args.device == "gpu" else gpt.measured_peak_flops()
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); "
          f"{'no GPU here: CPU numbers, ' if args.device == 'cpu' else ''}"
          f"peak {peak / 1e9:.1f} GFLOP/s ({'measured f32 matmul' if args.device == 'cpu' else 'datasheet'})")
    print(f"{'depth':>5} {'layout':>9} {'compile s':>10} {'step ms':>9} {'tokens/s':>10} {'GFLOP/step':>11} {'MFU':>7}")
    for depth in args.depths:
        for scan in (True, False):
            if not scan and depth > args.skip_unrolled_above:
                continue
            r = bench(depth, scan, args.steps, args.device, peak)
            print(f"{r['depth']:>5} {r['layout']:>9} {r['compile_s']:>10.2f} {r['step_ms']:>9.1f} "
                  f"{r['tokens_per_s']:>10.0f} {r['gflops_per_step']:>11.2f} {r['mfu']:>7.1%}", flush=True)


if __name__ == "__main__":
    main()
