"""Scaling curves: step time against batch size (CNN), sequence length (GPT, einsum vs fused
attention), width (GPT) and depth (GPT compile time, scanned vs unrolled layers).

Each point jits the experiment's own train step with donation, on one cached batch; step
times are medians of timed windows. FLOPs per step come from XLA's cost analysis (of the
unrolled layout for GPT), so each panel also shows how achieved FLOP/s grows with work.
"""

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import measure
from experiments import cnn, gpt

SIZES = {
    # name: (full sweep, --quick sweep)
    "batch": ((32, 64, 128, 256, 512), (8, 16)),
    "seq_len": ((64, 128, 256, 512), (16, 32)),
    "width": ((64, 128, 256, 512), (16, 32)),
    "depth": ((2, 8, 32), (1, 2)),
}


def _time_step(experiment, config, batch, windows: int, target_s: float, flops=None) -> dict:
    """Compile seconds, median step seconds and FLOPs of `experiment.train_step` on `batch`."""
    key = jax.random.key(0)
    state = jax.jit(functools.partial(experiment.init, config))(key, batch)
    step = jax.jit(functools.partial(experiment.train_step, config), donate_argnums=(0,))
    compiled, compile_s, compile_cpu_s = measure.compile_timed(step, state, batch, key)
    holder = [state]

    def window(n):
        s = holder[0]
        for _ in range(n):
            s, m = compiled(s, batch, key)
        jax.block_until_ready(m)
        holder[0] = s

    window(1)  # warm-up
    n = measure.steps_for(window, target_s)
    times = []
    for _ in range(windows):
        t = time.perf_counter()
        window(n)
        times.append((time.perf_counter() - t) / n)
    step_s = statistics.median(times)
    flops = measure.flops_of(compiled) if flops is None else flops
    return {"compile_s": compile_s, "compile_cpu_s": compile_cpu_s, "step_ms": 1e3 * step_s, "gflops_per_step": flops / 1e9,
            "gflops_per_s": flops / step_s / 1e9}


def _gpt_config(layers=2, width=128, length=64, batch=8, fused=False, scan=True):
    c = gpt.get_config()
    c.model.update(dict(num_layers=layers, features=width, num_heads=4, mlp_dim=4 * width, max_len=length,
                        use_fused=fused, scan_layers=scan))
    c.data.batch_size = batch
    return c


def _tokens(c):
    rng = np.random.default_rng(0)
    return {"tokens": jnp.asarray(rng.integers(0, c.model.vocab_size, (c.data.batch_size, c.model.max_len + 1),
                                               dtype=np.int32))}


def _gpt_point(c, windows, target_s):
    batch = _tokens(c)
    return _time_step(gpt, c, batch, windows, target_s, flops=gpt.flops_per_step(c, batch))


def run(quick: bool, windows: int, target_s: float, log=print, sweeps=tuple(SIZES)) -> dict:
    """The chosen sweeps (default all four): {sweep: [row, ...]}; the others stay empty."""
    unknown = set(sweeps) - set(SIZES)
    if unknown:
        raise ValueError(f"unknown scaling sweeps {sorted(unknown)}; expected some of {list(SIZES)}")
    pick = lambda name: SIZES[name][1 if quick else 0] if name in sweeps else ()
    out = {"batch": [], "seq_len": [], "width": [], "depth": []}
    rng = np.random.default_rng(0)
    for b in pick("batch"):
        c = cnn.get_config()
        c.data.batch_size = b
        batch = {"image": jnp.asarray(rng.integers(0, 256, (b, 8, 8, 1), dtype=np.uint8)),
                 "label": jnp.asarray(rng.integers(0, 10, (b,)), jnp.int32)}
        row = {"model": "cnn", "batch": b, **_time_step(cnn, c, batch, windows, target_s)}
        row["examples_per_s"] = b / row["step_ms"] * 1e3
        out["batch"].append(row)
        log(f"  scaling batch {b}: {row['step_ms']:.2f} ms/step")
    for length in pick("seq_len"):
        for fused in (False, True):
            row = {"model": "gpt 2L w128", "seq_len": length, "attention": "fused" if fused else "einsum",
                   **_gpt_point(_gpt_config(length=length, fused=fused), windows, target_s)}
            out["seq_len"].append(row)
            log(f"  scaling seq_len {length} {row['attention']}: {row['step_ms']:.1f} ms/step")
    for width in pick("width"):
        row = {"model": "gpt 2L", "width": width, **_gpt_point(_gpt_config(width=width), windows, target_s)}
        out["width"].append(row)
        log(f"  scaling width {width}: {row['step_ms']:.1f} ms/step")
    for depth in pick("depth"):
        flops = None
        for scan in (False, True):  # unrolled first: XLA counts a scanned body once, the unrolled count is the true one
            c = _gpt_config(layers=depth, scan=scan)
            row = {"model": "gpt w128", "depth": depth, "layers": "scan" if scan else "unrolled",
                   **_time_step(gpt, c, _tokens(c), max(1, windows // 2), target_s, flops=flops)}
            flops = row["gflops_per_step"] * 1e9
            out["depth"].append(row)
            log(f"  scaling depth {depth} {row['layers']}: compile {row['compile_s']:.1f} s")
    return out


def _panel(ax, rows, x: str, y: str, group: str | None = None, yscale: str = "log", **labels) -> None:
    if not rows:  # a sweep that was not run
        ax.set(title=labels.get("title", ""))
        return
    for kind in sorted({r[group] for r in rows}) if group else [None]:
        chosen = [r for r in rows if group is None or r[group] == kind]
        ax.plot([r[x] for r in chosen], [r[y] for r in chosen], "o-", label=kind)
    ax.set(xscale="log", yscale=yscale, xlabel=x.replace("_", " "), **labels)
    if group:
        ax.legend()


def plot(path: str, curves: dict) -> None:
    """The four sweeps as one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))  # an empty sweep leaves its panel empty
    _panel(axes[0], curves["batch"], "batch", "step_ms", ylabel="ms / step", title="CNN: step time vs batch")
    _panel(axes[1], curves["seq_len"], "seq_len", "step_ms", "attention", ylabel="ms / step",
           title="GPT 2L w128, batch 8: einsum vs fused attention")
    _panel(axes[2], curves["width"], "width", "step_ms", ylabel="ms / step", title="GPT 2L, batch 8 x 64: vs width")
    _panel(axes[3], curves["depth"], "depth", "compile_cpu_s", "layers", yscale="linear", ylabel="compile CPU s",
           title="GPT w128: compile time vs depth")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
