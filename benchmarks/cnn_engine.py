"""CNN through jaxml's engine vs a bare hand-written jitted step: compile time, steps/s, overhead.

    python -m benchmarks.cnn_engine [--batch 128] [--windows 7] [--steps 50]

Three timings of the same model, optimizer, augmentation and batch, in one process:
  bare    a hand-written `jax.jit` step (value_and_grad + optax update), one cached batch;
  engine  the experiment's train_step as the engine compiles it (shardings, donation,
          fold_in of the step, on-device metrics), one cached batch;
  loop    `jaxml.train.loop.train` end to end: grain pipeline, host->device transfer,
          metrics fetched one step late, progress and JSONL logging (no eval, no checkpoints
          inside the timed windows).
Step times are medians of timed windows after warm-up, each ended by block_until_ready.
Goal (issue 2): engine / bare <= 1.05.
"""

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

from experiments import cnn
from jaxml import data, losses
from jaxml.train import log, loop, optim, parallel


def _median_step_time(run_window, windows: int, steps: int) -> float:
    times = []
    for _ in range(windows):
        t = time.perf_counter()
        run_window(steps)
        times.append((time.perf_counter() - t) / steps)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--windows", type=int, default=7)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()

    config = cnn.get_config()
    config.data.batch_size = args.batch
    source = data.load_source(config.data.name, config.data.train_split, config.data.data_dir, cache=True)
    host_batch = next(iter(data.train_dataset(source, global_batch_size=args.batch, seed=0)))
    key = jax.random.key(0)

    # ---- bare: what a user would write by hand ----
    model = cnn.model(config)
    tx = optim.make_optimizer(config.optim, config.train.steps)
    params = jax.jit(lambda r, x: model.init({"params": r}, x, train=False)["params"])(
        key, jnp.asarray(host_batch["image"], jnp.float32) / 255.0)
    bare_state = (params, tx.init(params), jnp.zeros((), jnp.int32))

    def bare_step(state, images_u8, labels, key):
        params, opt_state, step = state
        aug_rng, drop_rng = jax.random.split(jax.random.fold_in(key, step))
        x = data.augment(aug_rng, images_u8.astype(jnp.float32) / 255.0, crop_padding=1, flip=False)

        def loss_fn(p):
            logits = model.apply({"params": p}, x, train=True, rngs={"dropout": drop_rng})
            return losses.cross_entropy(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, step + 1), loss

    bare_step = jax.jit(bare_step, donate_argnums=(0,))
    images, labels = jnp.asarray(host_batch["image"]), jnp.asarray(host_batch["label"])
    t = time.perf_counter()
    bare_compiled = bare_step.lower(bare_state, images, labels, key).compile()
    bare_compile = time.perf_counter() - t

    def bare_window(n):
        nonlocal bare_state
        for _ in range(n):
            bare_state, loss = bare_compiled(bare_state, images, labels, key)
        jax.block_until_ready(loss)

    # ---- engine: the experiment's step as the engine compiles and places it ----
    placement = parallel.setup(config.parallel, init_fn=lambda r, b: cnn.init(config, r, b),
                               train_step=lambda s, b, r: cnn.train_step(config, s, b, r), eval_step=None,
                               example_batch=host_batch, global_batch_size=args.batch)
    batch = placement.place_batch(host_batch)
    state = placement.init(key, host_batch)
    t = time.perf_counter()
    engine_compiled = placement.train_step.lower(state, batch, key).compile()
    engine_compile = time.perf_counter() - t

    def engine_window(n):
        nonlocal state
        for _ in range(n):
            state, metrics = engine_compiled(state, batch, key)
        jax.block_until_ready(metrics)

    for window in (bare_window, engine_window):
        window(args.steps)  # warm-up
    # Interleave the two so machine noise hits both alike.
    bare_times, engine_times = [], []
    for _ in range(args.windows):
        bare_times.append(_median_step_time(bare_window, 1, args.steps))
        engine_times.append(_median_step_time(engine_window, 1, args.steps))
    bare_t, engine_t = statistics.median(bare_times), statistics.median(engine_times)

    # ---- loop: the whole engine with the real pipeline and logging ----
    with tempfile.TemporaryDirectory() as workdir:
        lc = cnn.get_config()
        lc.data.batch_size = args.batch
        lc.train.steps = args.steps * (args.windows + 1)
        lc.train.log_every = args.steps
        lc.train.eval_every = 0
        lc.checkpoint.every_steps = lc.train.steps  # one save, after the last window
        lc.log.progress = False
        t = time.perf_counter()
        loop.train(_NoEval, lc, workdir)
        rows = [r for r in log.read_metrics(workdir) if "perf/steps_per_sec" in r]
        loop_t = statistics.median(1.0 / r["perf/steps_per_sec"] for r in rows[1:])  # first window compiles

    print(f"CNN (LeNet 32-64-128, digits 8x8, batch {args.batch}, adamw) on {jax.devices()[0].platform} "
          f"x{jax.device_count()}, jax {jax.__version__}")
    print(f"{'':8}{'compile s':>10}{'ms/step':>10}{'steps/s':>10}{'vs bare':>9}")
    print(f"{'bare':8}{bare_compile:10.2f}{bare_t * 1e3:10.2f}{1 / bare_t:10.1f}{1.0:9.3f}")
    print(f"{'engine':8}{engine_compile:10.2f}{engine_t * 1e3:10.2f}{1 / engine_t:10.1f}{engine_t / bare_t:9.3f}")
    print(f"{'loop':8}{'':>10}{loop_t * 1e3:10.2f}{1 / loop_t:10.1f}{loop_t / bare_t:9.3f}")
    print(f"engine overhead (engine/bare): {engine_t / bare_t:.3f}  (goal <= 1.05); "
          f"whole loop incl. input pipeline: {loop_t / bare_t:.3f}")


class _NoEval:
    """The CNN experiment without eval and report, so the timed loop is training only."""

    __name__ = "cnn-no-eval"
    get_config = staticmethod(cnn.get_config)
    init = staticmethod(cnn.init)
    train_step = staticmethod(cnn.train_step)
    eval_step = None
    report = None


if __name__ == "__main__":
    main()
