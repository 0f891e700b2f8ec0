"""Scaling curves: step time against batch size (CNN), sequence length (GPT, einsum vs fused
attention), width (GPT) and depth (GPT compile time, scanned vs unrolled layers); and the
rematerialisation policies (GPT, scanned and unrolled, and the diffusion U-Net's residual
blocks: step time and the compiled step's temporary memory).

Each point jits the experiment's own train step with donation, on one cached batch; step
times are medians of timed windows, in wall time and in CPU time of this process (all its
threads: the work a step costs, which moves far less than wall time on a shared machine).
FLOPs per step come from XLA's cost analysis (of the unrolled layout for GPT), so each panel
also shows how achieved FLOP/s grows with work. The CPU sweeps stop where a point takes
seconds per step on 2 cores (the whole default run: ~6 CPU-minutes); `--device gpu` extends them.
"""

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import families, measure
from experiments import cnn, diffusion, gpt
from jaxml.models import remat

SIZES = {
    # name: (CPU sweep, GPU sweep, --quick sweep)
    "batch": ((16, 32, 64, 128, 256), (32, 64, 128, 256, 512, 1024), (8, 16)),
    "seq_len": ((32, 64, 128, 256), (128, 256, 512, 1024, 2048), (16, 32)),
    "width": ((32, 64, 128, 256), (128, 256, 512, 1024), (16, 32)),
    "depth": ((2, 8, 32), (2, 8, 32), (1, 2)),
    "remat": (remat.CHOICES,) * 3,  # policies, not sizes
}
# The remat sweep's GPT: (layers, width, context, batch); long contexts, where activations dominate memory.
# Both layouts: unrolled blocks take jaxml.models.remat's cotangent-tied form where XLA would merge a plain
# recomputation back into the forward pass (jaxlib < 0.11 on CPU), scanned ones plain jax.checkpoint.
# The U-Net's residual blocks (unrolled) at the benchmark family's size follow the GPT's rows.
REMAT_GPT = {"cpu": (4, 128, 256, 8), "gpu": (12, 768, 1024, 8), "quick": (2, 32, 32, 4)}


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
    timed = measure.interleaved({"step": window}, {"step": n}, windows)["step"]
    step_s = timed["median_s"]
    flops = measure.flops_of(compiled) if flops is None else flops
    memory = compiled.memory_analysis()
    return {"compile_s": compile_s, "compile_cpu_s": compile_cpu_s, "step_ms": 1e3 * step_s,
            "cpu_ms": 1e3 * timed["cpu_s"], "gflops_per_step": flops / 1e9, "gflops_per_s": flops / step_s / 1e9,
            # XLA's temporaries: what the activations kept for the backward pass take (no memory_stats on CPU).
            "temp_mb": None if memory is None else memory.temp_size_in_bytes / 2**20}


def _gpt_config(layers=2, width=128, length=64, batch=8, fused=False, scan=True, remat="none"):
    c = gpt.get_config()
    c.model.update(dict(num_layers=layers, features=width, num_heads=4, mlp_dim=4 * width, max_len=length,
                        use_fused=fused, scan_layers=scan, remat=remat))
    c.data.batch_size = batch
    return c


def _tokens(c):
    rng = np.random.default_rng(0)
    return {"tokens": jnp.asarray(rng.integers(0, c.model.vocab_size, (c.data.batch_size, c.model.max_len + 1),
                                               dtype=np.int32))}


def _unet_remat_point(policy: str, device: str, quick: bool, windows: int, target_s: float) -> dict:
    """The remat sweep's row for the benchmark family's U-Net with `policy` on every residual block."""
    w = families.workload("unet", device, quick=quick)
    w.config.model.remat = policy
    m = w.config.model
    size = f"{w.config.data.batch_size}x{m.image_size}x{m.image_size}"
    return {"model": f"unet ch{m.channels} mults {'-'.join(map(str, m.channel_mults))}, {size}",
            "remat": policy, "layers": "unrolled", **_time_step(diffusion, w.config, w.batch, windows, target_s)}


def _gpt_point(c, windows, target_s):
    batch = _tokens(c)
    return _time_step(gpt, c, batch, windows, target_s, flops=gpt.flops_per_step(c, batch))


def run(quick: bool, windows: int, target_s: float, log=print, sweeps=tuple(SIZES), device: str = "cpu") -> dict:
    """The chosen sweeps (default all five) at `device`'s sizes: {sweep: [row, ...]}; the others stay empty."""
    unknown = set(sweeps) - set(SIZES)
    if unknown:
        raise ValueError(f"unknown scaling sweeps {sorted(unknown)}; expected some of {list(SIZES)}")
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    tier = "quick" if quick else device
    pick = lambda name: SIZES[name][("cpu", "gpu", "quick").index(tier)] if name in sweeps else ()
    out = {name: [] for name in SIZES}
    rng = np.random.default_rng(0)
    for b in pick("batch"):
        c = cnn.get_config()
        c.data.batch_size = b
        batch = {"image": jnp.asarray(rng.integers(0, 256, (b, 8, 8, 1), dtype=np.uint8)),
                 "label": jnp.asarray(rng.integers(0, 10, (b,)), jnp.int32)}
        row = {"model": "cnn", "batch": b, **_time_step(cnn, c, batch, windows, target_s)}
        row["examples_per_s"] = b / row["step_ms"] * 1e3
        out["batch"].append(row)
        log(f"  scaling batch {b}: {row['step_ms']:.2f} ms/step ({row['cpu_ms']:.2f} CPU)")
    for length in pick("seq_len"):
        for fused in (False, True):
            row = {"model": "gpt 2L w128", "seq_len": length, "attention": "fused" if fused else "einsum",
                   **_gpt_point(_gpt_config(length=length, fused=fused), windows, target_s)}
            out["seq_len"].append(row)
            log(f"  scaling seq_len {length} {row['attention']}: {row['step_ms']:.1f} ms/step ({row['cpu_ms']:.1f} CPU)")
    for width in pick("width"):
        row = {"model": "gpt 2L", "width": width, **_gpt_point(_gpt_config(width=width), windows, target_s)}
        out["width"].append(row)
        log(f"  scaling width {width}: {row['step_ms']:.1f} ms/step ({row['cpu_ms']:.1f} CPU)")
    for depth in pick("depth"):
        flops = None
        for scan in (False, True):  # unrolled first: XLA counts a scanned body once, the unrolled count is the true one
            c = _gpt_config(layers=depth, scan=scan)
            row = {"model": "gpt w128", "depth": depth, "layers": "scan" if scan else "unrolled",
                   **_time_step(gpt, c, _tokens(c), max(1, windows // 2), target_s, flops=flops)}
            flops = row["gflops_per_step"] * 1e9
            out["depth"].append(row)
            log(f"  scaling depth {depth} {row['layers']}: compile {row['compile_s']:.1f} s")
    layers, width, length, batch = REMAT_GPT[tier]
    for scan in (True, False) if pick("remat") else ():
        for policy in pick("remat"):
            c = _gpt_config(layers, width, length, batch, scan=scan, remat=policy)
            # Unrolled: the compiled step's own FLOP count is the true one (recomputation included).
            row = {"model": f"gpt {layers}L w{width}, {batch}x{length}", "remat": policy,
                   "layers": "scan" if scan else "unrolled",
                   **(_gpt_point(c, windows, target_s) if scan else _time_step(gpt, c, _tokens(c), windows, target_s))}
            out["remat"].append(row)
            log(f"  scaling remat {policy} {row['layers']}: {row['step_ms']:.1f} ms/step ({row['cpu_ms']:.1f} CPU), "
                f"temporaries {row['temp_mb']:.1f} MB")
    for policy in pick("remat"):
        row = _unet_remat_point(policy, device, tier == "quick", windows, target_s)
        out["remat"].append(row)
        log(f"  scaling remat {policy} unet: {row['step_ms']:.1f} ms/step ({row['cpu_ms']:.1f} CPU), "
            f"temporaries {row['temp_mb']:.1f} MB")
    return out


def _panel(ax, rows, x: str, y: str, group: str | None = None, yscale: str = "log", **labels) -> None:
    rows = [r for r in rows if r.get(y) is not None]  # results from before a column existed lack it
    if not rows:  # a sweep that was not run
        ax.set(title=labels.get("title", ""))
        return
    for kind in sorted({r[group] for r in rows}) if group else [None]:
        chosen = [r for r in rows if group is None or r[group] == kind]
        ax.plot([r[x] for r in chosen], [r[y] for r in chosen], "o-", label=kind)
    ax.set(xscale="log", yscale=yscale, xlabel=x.replace("_", " "), **labels)
    points = sorted({r[x] for r in rows})
    ax.set_xticks(points, [str(p) for p in points])  # the measured sizes, not 10^k ticks
    ax.minorticks_off()
    if group:
        ax.legend()


def _remat_panel(ax, rows) -> None:
    """Temporary memory (bars) and CPU time per step (markers, right axis) of each remat policy, per
    model and layout (results from before the U-Net rows name the GPT's layout alone)."""
    ax.set(title="remat policy")
    if not rows:
        return
    policies = list(dict.fromkeys(r["remat"] for r in rows))
    group = lambda r: f"{r['model'].split()[0]} {r.get('layers', '?')}"
    groups = list(dict.fromkeys(group(r) for r in rows))
    at = np.arange(len(policies))
    width = 0.8 / len(groups)
    twin = ax.twinx()
    for i, name in enumerate(groups):
        chosen = {r["remat"]: r for r in rows if group(r) == name}
        offset = (i - (len(groups) - 1) / 2) * width
        ax.bar(at + offset, [(chosen[p]["temp_mb"] or 0) if p in chosen else 0 for p in policies], 0.95 * width,
               label=f"{name}: temporaries MB")
        twin.plot(at + offset, [chosen[p].get("cpu_ms") or chosen[p]["step_ms"] if p in chosen else np.nan
                                for p in policies], "k" + "D^svo"[i % 5], label=f"{name}: CPU ms/step")
    ax.set_xticks(at, [p.replace("_with_no_batch_dims", "_no_batch").replace("_saveable", "") for p in policies])
    ax.set_ylabel("compiled temporaries, MB")
    twin.set_ylabel("CPU ms / step")
    # Headroom above bars and markers for the legend.
    ax.set_ylim(0, 1.8 * max(r["temp_mb"] or 0 for r in rows) or 1)
    twin.set_ylim(0, 1.8 * max(r.get("cpu_ms") or r["step_ms"] for r in rows))
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=6, loc="upper center", ncol=2)
    ax.set_title(f"{rows[0]['model']}" + (" and the U-Net" if len({r["model"] for r in rows}) > 1 else "")
                 + ": remat policy")


def plot(path: str, curves: dict) -> None:
    """The sweeps as one PNG: step time in CPU ms (wall time where a result predates that column)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def step(rows):
        return "cpu_ms" if rows and all(r.get("cpu_ms") is not None for r in rows) else "step_ms"

    fig, axes = plt.subplots(1, 5, figsize=(24, 4.2))  # an empty sweep leaves its panel empty
    for ax, name, title, group in ((axes[0], "batch", "CNN: step time vs batch", None),
                                   (axes[1], "seq_len", "GPT 2L w128, batch 8: einsum vs fused attention", "attention"),
                                   (axes[2], "width", "GPT 2L, batch 8 x 64: vs width", None)):
        rows = curves.get(name) or []
        y = step(rows)
        _panel(ax, rows, name, y, group, ylabel="CPU ms / step" if y == "cpu_ms" else "ms / step", title=title)
    _panel(axes[3], curves["depth"], "depth", "compile_cpu_s", "layers", yscale="linear", ylabel="compile CPU s",
           title="GPT w128: compile time vs depth")
    _remat_panel(axes[4], curves.get("remat") or [])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
