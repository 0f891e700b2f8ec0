"""Timing, FLOP counts, memory and device peaks: the measuring tools every benchmark here shares.

Step times are medians of timed windows after a warm-up, each window ended by
`block_until_ready` (JAX) or by the synchronous return of the last step (PyTorch on CPU).
Contenders are timed in interleaved windows inside one process, so the noise of a shared
machine hits them alike and their *ratios* are the figures to trust.
"""

import platform
import re
import statistics
import time
from typing import Callable

import jax

from experiments import gpt

# Dense peak FLOP/s per chip from the vendors' datasheets (no sparsity), by compute dtype.
# Matched against `jax.devices()[0].device_kind` (or torch's device name) by the first
# substring that occurs in it, so the more specific names come first.
PEAKS = (
    # (substring of the device kind, bfloat16 peak, float32 peak)
    ("H200", 989e12, 67e12),
    ("H100 PCIe", 756e12, 51e12),
    ("H100", 989e12, 67e12),  # SXM
    ("A100", 312e12, 19.5e12),
    ("TPU v6 lite", 918e12, None),  # v6e (Trillium)
    ("TPU v6e", 918e12, None),
    ("TPU v5 lite", 197e12, None),  # v5e
    ("TPU v5e", 197e12, None),
    ("TPU v5p", 459e12, None),
    ("TPU v5", 459e12, None),  # v5p reports itself as "TPU v5"
    ("TPU v4", 275e12, None),
)


# The vector units that decide a CPU's matmul and convolution speed, as /proc/cpuinfo names them.
_CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile", "amx_bf16",
                 "asimd", "sve")


def cpu_description(cpuinfo: str | None = None) -> str:
    """The host CPU's model and vector units ("AMD EPYC 7B13; avx2 fma"), from /proc/cpuinfo where
    there is one: ratios against PyTorch move with them (oneDNN uses AVX-512 and AMX where the
    CPU has them), so a result must say which CPU it ran on."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    model = fields.get("model name") or fields.get("Model") or fields.get("CPU part") or platform.machine()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return f"{model}; " + (" ".join(f for f in _CPU_FEATURES if f in flags) or "no vector extensions listed")


def datasheet_peak(device_kind: str, dtype: str) -> float | None:
    """The datasheet peak FLOP/s of `device_kind` for compute in `dtype`, None if not in PEAKS."""
    for name, bf16, fp32 in PEAKS:
        if name.lower() in device_kind.lower():
            return bf16 if dtype in ("bfloat16", "float16") else fp32
    return None


def device_peak(dtype: str) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) of JAX's first device for `dtype` compute."""
    kind = jax.devices()[0].device_kind
    peak = datasheet_peak(kind, dtype)
    if peak is not None:
        return peak, f"datasheet {dtype} peak of {kind}"
    if jax.default_backend() != "cpu":
        raise ValueError(f"no datasheet peak for device {kind!r} ({dtype}); known: {[p[0] for p in PEAKS]}")
    # experiments.gpt reports its MFU against the same measured peak.
    return gpt.measured_peak_flops(), "measured float32 1024x1024 matmul on this CPU"


def compile_timed(jitted, *args) -> tuple[object, float, float]:
    """(compiled executable, wall seconds, CPU seconds of this process) to lower and compile a
    jitted function for `args`. The CPU seconds hardly move with the load of a shared machine."""
    t, cpu = time.perf_counter(), time.process_time()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t, time.process_time() - cpu


def flops_of(compiled_or_lowered) -> float:
    """XLA's FLOP count of one call. XLA counts a loop body once, not once per trip:
    callers with scanned layers or time steps count an unrolled program instead."""
    cost = compiled_or_lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def memory_of(compiled) -> dict:
    """Peak device memory: the backend's live counter where it keeps one (GPU/TPU), else
    XLA's buffer assignment of the compiled step (arguments + outputs - donated aliases + temporaries)."""
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return {"peak_bytes": int(stats["peak_bytes_in_use"]), "source": "device memory_stats"}
    m = compiled.memory_analysis()
    if m is None:
        return {"peak_bytes": None, "source": "not reported by this backend"}
    # XLA:CPU's peak_memory_in_bytes leaves the temporaries out (a GPT step: 10 MB of it against
    # 247 MB of temporaries), so the buffer sum is taken where it is larger.
    buffers = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    peak = max(getattr(m, "peak_memory_in_bytes", 0) or 0, buffers)
    return {"peak_bytes": int(peak), "temp_bytes": int(m.temp_size_in_bytes), "source": "compiled.memory_analysis()"}


def interleaved(windows: dict[str, Callable[[int], None]], steps: dict[str, int], repeats: int,
                settle_steps: int = 1) -> dict:
    """Median seconds per step of each contender, timing their windows in turn `repeats` times.

    `windows[name](n)` runs n steps and returns only when they are done. `cpu_s` is the median
    CPU time of this process per step (all its threads): the work a step costs, which moves far
    less than the wall time when other jobs take the cores. A window run by another process
    (the PyTorch worker) returns that process's CPU seconds, which count instead.

    Each timed window starts after `settle_steps` untimed steps of its own contender: the first
    step after another process's window, or after the machine idled, runs cold (2 cores, jax
    0.10.2, the GPT's engine step: 101 ms after a PyTorch worker's window, 107 after 0.5 s idle,
    85 in steady state), so without them whichever contender follows another process's window
    pays for it (the engine, timed right after the PyTorch twin, read 1.05-1.06x the bare step
    that followed it; 1.00 with no twin, and with the settle step)."""
    times = {name: [] for name in windows}
    cpu = {name: [] for name in windows}
    for _ in range(repeats):
        for name, window in windows.items():
            if settle_steps:
                window(settle_steps)
            t, c = time.perf_counter(), time.process_time()
            elsewhere = window(steps[name])
            times[name].append((time.perf_counter() - t) / steps[name])
            used = elsewhere if isinstance(elsewhere, float) else time.process_time() - c
            cpu[name].append(used / steps[name])
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "windows": len(ts),
                   "window_s": ts, "cpu_s": statistics.median(cpu[name])}
            for name, ts in times.items()}


def paired_range(numerator_s: list[float], denominator_s: list[float]) -> tuple[float, float]:
    """The lowest and highest ratio of two contenders' windows of the same round of `interleaved`
    (each pair ran back to back, so a slow spell of the machine hits both alike).

    The ratio of the two medians always lies in this range: if every window of the numerator
    is at most r times its partner, so is its median. A range that straddles 1.0 is a tie."""
    if len(numerator_s) != len(denominator_s) or not numerator_s:
        raise ValueError(f"paired_range: needs windows from the same rounds, got {len(numerator_s)} "
                         f"and {len(denominator_s)}")
    ratios = [a / b for a, b in zip(numerator_s, denominator_s)]
    return min(ratios), max(ratios)


_METADATA = re.compile(r", metadata=\{[^}]*\}")


def program_text(compiled) -> str:
    """The optimised HLO of a compiled executable without its source metadata (op names, stack
    frames, file locations), which differ between two traces of the same program: equal texts
    mean XLA built the same program."""
    kept, in_tables = [], False
    for line in compiled.as_text().splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            in_tables = True
        elif in_tables and (line.startswith("%") or line.startswith("ENTRY")):
            in_tables = False
        if not in_tables:
            kept.append(_METADATA.sub("", line))
    return "\n".join(kept)


def steps_for(window: Callable[[int], None], target_s: float, cap: int = 200) -> int:
    """How many steps make a window of about `target_s` seconds (one timed step after the warm-up)."""
    t = time.perf_counter()
    window(1)
    one = max(time.perf_counter() - t, 1e-6)
    return int(max(1, min(cap, round(target_s / one))))
