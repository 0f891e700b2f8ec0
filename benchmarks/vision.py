"""ResNet-20 and ViT training throughput (images/s) at a fixed batch, through the experiments' own steps.

    python -m benchmarks.vision [--batch 64] [--windows 5] [--steps 5] [--image-size 32] [--only resnet20,vit]

Times `experiments.resnet.train_step` (random crop on, SGD+Nesterov, BatchNorm in training
mode) and `experiments.vit.train_step` (its default small ViT, 4x4 patches, AdamW), each
jitted with donation, on one cached batch of CIFAR-shaped inputs (no on-device resize:
inputs are already image_size x image_size);
median of timed windows after one warm-up window. float32 only: the GPU/TPU bfloat16 path
(`--config.model.dtype=bfloat16`) is not measured here, as this machine has no accelerator.
"""

import argparse
import functools
import statistics
import time

import jax
import numpy as np

from experiments import resnet, vit


def _throughput(experiment, config, batch, args) -> tuple[float, float, list[float]]:
    """(compile seconds, median seconds per step, all window times) of `experiment`'s train step."""
    state = jax.jit(functools.partial(experiment.init, config))(jax.random.key(0), batch)
    step = jax.jit(functools.partial(experiment.train_step, config), donate_argnums=(0,))
    key = jax.random.key(1)
    t = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - t

    def window(state):
        for _ in range(args.steps):
            state, metrics = compiled(state, batch, key)
        jax.block_until_ready(metrics)
        return state

    state = window(state)  # warm-up
    times = []
    for _ in range(args.windows):
        t = time.perf_counter()
        state = window(state)
        times.append((time.perf_counter() - t) / args.steps)
    return compile_s, statistics.median(times), times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--only", default="resnet20,vit", help="comma-separated: resnet20, vit")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    batch = jax.device_put({
        "image": rng.integers(0, 256, (args.batch, args.image_size, args.image_size, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, args.batch)})
    for name in args.only.split(","):
        if name == "resnet20":
            experiment = resnet
        elif name == "vit":
            experiment = vit
        else:
            raise SystemExit(f"--only: unknown model {name!r}; choose from resnet20, vit")
        config = experiment.get_config()
        config.model.image_size = args.image_size
        config.data.batch_size = args.batch
        compile_s, step_s, times = _throughput(experiment, config, batch, args)
        print(f"{name:9} train step, batch {args.batch} x {args.image_size}x{args.image_size}x3, float32, "
              f"{jax.device_count()} x {jax.devices()[0].platform}: compile {compile_s:.1f} s, "
              f"{step_s * 1e3:.0f} ms/step (median of {args.windows} windows x {args.steps} steps; "
              f"min {min(times) * 1e3:.0f}, max {max(times) * 1e3:.0f}), {args.batch / step_s:.0f} images/s")
    print("Not measured here: the GPU/TPU path with --config.model.dtype=bfloat16 (no accelerator on this machine).")


if __name__ == "__main__":
    main()
