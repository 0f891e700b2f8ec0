"""jaxml's performance suite: one run, every family, side by side with what users would pick instead.

    python -m benchmarks.run                                  # everything, CPU sizes (~10 min on 2 cores)
    python -m benchmarks.run --only cnn,gpt --out /tmp/bench  # some families
    python -m benchmarks.run --quick --only cnn               # seconds: tiny sizes, smoke test
    python -m benchmarks.run --device gpu                     # GPU sizes, bfloat16, torch.compile on cuda

Per family (benchmarks/families.py gives the fixed sizes): compile time, steady-state step
time (median of timed windows after a warm-up, ended by block_until_ready), throughput,
FLOPs per step from the compiled step's cost analysis, achieved FLOP/s and MFU against the
device's peak (benchmarks/measure.py: datasheet peaks for H100/H200/A100/TPU v4-v6e, a measured
matmul peak on CPU), and peak device memory. Interleaved window by window, so machine noise
hits all alike:
  - the PyTorch twin (benchmarks/torch_twins.py), eager and torch.compile, each in a worker
    process of its own (benchmarks/torch_worker.py: beside XLA PyTorch ran slower): jaxml/PyTorch
    time ratios;
  - a bare hand-written jitted Flax step of the same model (the engine's overhead);
  - the real grain input pipeline vs one cached device batch (the pipeline's cost);
  - with --xla-options, jaxml's own step compiled with other XLA options (per program:
    config.parallel.xla_options), e.g. --xla-options "xla_cpu_enable_fast_math=True";
then scaling curves (benchmarks/scaling.py). Writes results.json, results.md and scaling.png to --out.
"""

import argparse
import ast
import datetime
import functools
import json
import os
import platform
import sys
import tempfile
import time

FLAGS_NOTE = ("PyTorch runs with its own OpenMP defaults (worker threads spin between parallel regions), as "
              "its users get it; --torch-omp-passive sets OMP_WAIT_POLICY=PASSIVE, for a machine shared with "
              "other jobs, where spinning threads lose their cores and its steps take 10-30x longer")


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated families (default: all): "
                    "cnn,resnet20,resnet50,vit,lstm,gpt,unet")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="compute dtype (default: float32 on cpu, bfloat16 on gpu); params stay float32")
    ap.add_argument("--out", default="benchmarks/results", help="where results.json, results.md and scaling.png go")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few windows: a smoke run")
    ap.add_argument("--windows", type=int, default=None, help="timed windows per contender (default 5, quick 2)")
    ap.add_argument("--window-s", type=float, default=None, help="target seconds per window (default 0.5)")
    ap.add_argument("--torch", default="all", help="families timed against the PyTorch twin (all | none | list)")
    ap.add_argument("--torch-compile", default="cnn,gpt",
                    help="families also timed with torch.compile (all | none | list; it compiles for minutes on 2 cores)")
    ap.add_argument("--bare", default="cnn,resnet20,vit,lstm,gpt",
                    help="families timed against a bare jitted Flax step (classifiers and LMs)")
    ap.add_argument("--pipeline", default="cnn,gpt", help="families whose real grain pipeline is timed")
    ap.add_argument("--no-sampling", action="store_true",
                    help="skip the U-Net sampling timing (DDPM 1000 levels vs DDIM 50 steps, per image)")
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--scaling", default="batch,seq_len,width,depth,remat",
                    help="which scaling sweeps to run (remat: GPT and U-Net step time and temporaries per remat policy)")
    ap.add_argument("--torch-omp-passive", action="store_true",
                    help="OMP_WAIT_POLICY=PASSIVE for PyTorch (only on a machine shared with other jobs: on an idle "
                         "one it makes PyTorch's small-op steps up to 1.6x slower than its default)")
    ap.add_argument("--no-keep-host-memory", action="store_true",
                    help="leave glibc's malloc as it is (by default the process keeps freed memory, as the CLI "
                         "does: jaxml.runtime.keep_host_memory; it applies to the PyTorch twins alike)")
    ap.add_argument("--no-multithreaded-convolutions", action="store_true",
                    help="leave XLA:CPU's convolutions where the installed jaxlib puts them (by default, as the CLI "
                         "does, jaxlib 0.10's single-threaded YNNPACK convolutions go to Eigen: "
                         "jaxml.runtime.multithreaded_convolutions)")
    ap.add_argument("--cpu-devices", type=int, default=1,
                    help="run the CPU as this many XLA devices, jaxml's step data parallel over them, convolutions "
                         "on YNNPACK's one thread per device (jaxml.runtime.cpu_devices, the CLI's --cpu_devices); "
                         "the bare Flax step, which is one device's, is left out then")
    ap.add_argument("--no-unrolled-threefry", action="store_true",
                    help="keep JAX's rolled threefry loop on CPU (by default, as the CLI does, the hash is lowered "
                         "unrolled, as on GPU/TPU: jaxml.runtime.unrolled_threefry)")
    ap.add_argument("--xla-options", nargs="+", default=[], metavar="NAME=VALUE[;NAME=VALUE]",
                    help="variants of jaxml's step, each compiled with these XLA options (per program, as "
                         "config.parallel.xla_options sets them) and timed interleaved with the default step; "
                         "XLA_FLAGS names without '--', values as Python literals or plain strings, enum values "
                         "by full name")
    ap.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                    help="only merge the results.json of earlier runs (e.g. one process per family) into --out")
    args = ap.parse_args(argv)
    try:
        args.xla_variants = [xla_variant(v) for v in args.xla_options]
    except ValueError as e:
        ap.error(str(e))
    if args.cpu_devices < 1:
        ap.error(f"--cpu-devices {args.cpu_devices}: expected a device count >= 1")
    if args.cpu_devices > 1 and args.device != "cpu":
        ap.error("--cpu-devices splits the CPU: it goes with --device cpu")
    if args.cpu_devices > 1:  # their one-device programs would run under the split run's settings
        args.no_scaling = args.no_sampling = True
    args.windows = args.windows or (2 if args.quick else 5)
    args.window_s = args.window_s or (0.05 if args.quick else 0.5)
    return args


def xla_variant(text: str) -> tuple[tuple[str, object], ...]:
    """"name=value;name=value" as config.parallel.xla_options pairs; a value that reads as a
    Python literal (True, 2, 0.5) is one, anything else a string (enum names, comma lists)."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise ValueError(f"--xla-options {text!r}: expected NAME=VALUE items separated by ';', got {item!r}")
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            value = value.strip()
        pairs.append((name.strip(), value))
    if not pairs:
        raise ValueError(f"--xla-options {text!r}: expected at least one NAME=VALUE")
    return tuple(pairs)


def _variant_label(pairs) -> str:
    return "; ".join(f"{k}={v}" for k, v in pairs)


def _names(spec: str, universe) -> list[str]:
    if spec in ("all", ""):
        return list(universe)
    if spec == "none":
        return []
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in universe]
    if unknown:
        raise SystemExit(f"unknown families {unknown}; expected some of {list(universe)}")
    return names


def main(argv=None) -> dict:
    args = parse(argv)
    if args.merge:
        out = merge(args.merge)
        write(out, args.out)
        print(markdown(out))
        return out
    if args.torch_omp_passive and args.torch != "none":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read when torch loads OpenMP, so before its import

    from jaxml import runtime

    malloc_note = runtime.keep_host_memory(not args.no_keep_host_memory)
    runtime.cpu_devices(args.cpu_devices)
    # Split into devices, each program's convolutions run best on YNNPACK's one thread (as the CLI does).
    runtime.multithreaded_convolutions(not args.no_multithreaded_convolutions and args.cpu_devices == 1)
    threefry_note = runtime.unrolled_threefry(not args.no_unrolled_threefry)
    import jax

    from benchmarks import families, measure, scaling

    if args.device == "gpu" and jax.default_backend() != "gpu":
        raise SystemExit(f"--device gpu asked for, but JAX's backend is {jax.default_backend()!r}")
    if jax.device_count() < args.cpu_devices:
        raise SystemExit(f"--cpu-devices {args.cpu_devices}: JAX has {jax.device_count()} device(s) (XLA_FLAGS "
                         f"named another count before this run: {os.environ.get('XLA_FLAGS', '')!r})")
    _DEVICES[0] = args.cpu_devices
    from jaxml.train import parallel

    for pairs in args.xla_variants:  # XLA parses each variant now, before any family runs
        check = parallel.default_config()
        check.xla_options = pairs
        try:
            parallel.compiler_options(check, jax.default_backend())
        except ValueError as e:
            raise SystemExit(f"--xla-options {_variant_label(pairs)!r}: {e}")
    try:
        from benchmarks import torch_twins
        import torch
        torch_note = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    except ImportError as e:
        torch_twins, torch_note = None, f"PyTorch columns skipped: torch is not installed ({e}); pip install -e .[bench]"
    only = _names(args.only, families.FAMILIES)
    dtype = args.dtype or ("bfloat16" if args.device == "gpu" else "float32")
    peak, peak_source = measure.device_peak(dtype)
    out = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "jax": jax.__version__, "backend": jax.default_backend(),
                    "device_kind": jax.devices()[0].device_kind, "devices_used": args.cpu_devices,
                    "cpu": measure.cpu_description(),
                    "peak_flops": peak, "peak_source": peak_source, "torch": torch_note,
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "malloc": malloc_note or "glibc default",
                    "xla_flags": os.environ.get("XLA_FLAGS", ""), "threefry": threefry_note,
                    "load_avg_start": _load()},
        "settings": {"quick": args.quick, "windows": args.windows, "window_s": args.window_s, "dtype": dtype,
                     "note": FLAGS_NOTE},
        "families": [], "pipeline": [], "scaling": None,
    }
    print(f"jaxml benchmarks on {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}; "
          f"peak {peak / 1e9:.1f} GFLOP/s ({peak_source}); {torch_note}; malloc: {out['machine']['malloc']}", flush=True)
    torch_set = set(_names(args.torch, families.FAMILIES)) if torch_twins else set()
    compile_set = set(_names(args.torch_compile, families.FAMILIES)) & torch_set
    bare_set = set(_names(args.bare, families.FAMILIES)) if args.cpu_devices == 1 else set()
    for name in only:
        w = families.workload(name, args.device, args.quick, dtype)
        row = bench_family(w, args, peak, name in torch_set, name in compile_set,
                           name in bare_set and w.kind in ("classifier", "lm"))
        out["families"].append(row)
        print(_family_line(row), flush=True)
        write(out, args.out)  # after each family too: a crash later keeps what was measured
    for name in _names(args.pipeline, families.FAMILIES):
        if name in only and name in ("cnn", "gpt"):
            row = bench_pipeline(families.workload(name, args.device, args.quick, dtype), args)
            out["pipeline"].append(row)
            print(f"  pipeline {name}: {row['pipeline_steps_per_s']:.1f} steps/s with grain vs "
                  f"{row['cached_steps_per_s']:.1f} on a cached batch: ratio {_ratio(row, 'ratio', '.3f')}", flush=True)
    if "unet" in only and not args.no_sampling:
        out["sampling"] = bench_sampling(args)
        for r in out["sampling"]:
            print(f"  sample {r['method']} ({r['levels']} levels, guided): {r['ms_per_image']:.2f} ms/image "
                  f"at batch {r['batch']} (compile {r['compile_s']:.1f} s)", flush=True)
    if not args.no_scaling:
        out["scaling"] = scaling.run(args.quick, max(2, args.windows - 2), args.window_s,
                                     log=lambda s: print(s, flush=True), sweeps=args.scaling.split(","),
                                     device=args.device)
    out["machine"]["load_avg_end"] = _load()
    _remeasure_peak(out, dtype)
    write(out, args.out)
    print(markdown(out))
    return out


def _remeasure_peak(out: dict, dtype: str) -> None:
    """A CPU's peak is a measured matmul, so a busy spell of the host when it was measured would
    set it low and every MFU high (a run read 113 GFLOP/s where 200-215 is this host's, and an MFU
    of 101%): it is measured again at the end, the higher of the two counts, and the rows' MFU
    follow it. Datasheet peaks are left as they are."""
    from benchmarks import measure

    m = out["machine"]
    if measure.datasheet_peak(m["device_kind"], dtype) is not None:  # device_peak measured only without one
        return
    start = m["peak_flops"]
    end, _ = measure.device_peak(dtype)
    m["peak_start_end"] = [start, end]
    m["peak_flops"] = max(start, end)
    for r in out["families"]:
        r["mfu"] = r["flops_per_s"] / m["peak_flops"]


def _load():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


# ---- one family ------------------------------------------------------------------------


def bench_family(w, args, peak: float, with_torch: bool, torch_compile: bool, bare: bool) -> dict:
    import jax

    from benchmarks import families, measure

    batch_size = w.config.data.batch_size
    placement = _engine_placement(w, w.config, w.batch)
    key = jax.random.key(0)
    state = placement.init(key, w.batch)
    batch = placement.place_batch(w.batch)
    compiled, compile_s, compile_cpu_s = measure.compile_timed(placement.train_step, state, batch, key)
    # XLA's cost analysis counts one device's program: the whole step's is that times the devices
    # (the optimizer update each device repeats on replicated params counted on each).
    flops, flops_source = w.flops() if w.flops is not None else (
        measure.flops_of(compiled) * _DEVICES[0],
        "XLA cost analysis" + (f", x {_DEVICES[0]} devices" if _DEVICES[0] > 1 else ""))
    params = sum(x.size for x in jax.tree.leaves(state.params))
    row = {"family": w.name, "size": w.size, "dtype": w.dtype, "unit": w.unit, "batch": batch_size,
           "params": int(params), "compile_s": compile_s, "compile_cpu_s": compile_cpu_s, "flops_per_step": flops, "flops_source": flops_source,
           "memory": measure.memory_of(compiled)}
    windows = {"jaxml": _jax_window(compiled, state, batch, key)}
    variants = []  # (label, pairs, compile_s, program changed)
    default_program = measure.program_text(compiled) if args.xla_variants else None
    for pairs in args.xla_variants:
        config = w.config.copy_and_resolve_references()
        config.parallel.xla_options = pairs
        placed = _engine_placement(w, config, w.batch)
        variant_state = placed.init(key, w.batch)  # its own state: the step donates it
        variant, variant_compile_s, _ = measure.compile_timed(placed.train_step, variant_state, batch, key)
        label = f"xla {_variant_label(pairs)}"
        windows[label] = _jax_window(variant, variant_state, batch, key)
        variants.append((label, pairs, variant_compile_s, measure.program_text(variant) != default_program))
    if bare:
        bare_state, bare_step = families.bare_step(w.kind, families.model_of(w), w.config, w.batch)
        bare_compiled, row["bare_compile_s"], _ = measure.compile_timed(bare_step, bare_state, batch, key)
        windows["bare"] = _jax_window(bare_compiled, bare_state, batch, key)
    notes, workers = [], []
    if with_torch:
        from benchmarks import torch_worker

        for label, comp in (("torch", False), ("torch.compile", True)) if torch_compile else (("torch", False),):
            try:  # in a process of its own: beside XLA's compiled step PyTorch ran slower (torch_worker)
                t = time.perf_counter()
                twin = torch_worker.Twin(w.name, args.device, args.quick, w.dtype, compiled=comp,
                                         keep_host_memory=not args.no_keep_host_memory)
                workers.append(twin)
                row["torch_params"] = twin.params
                twin.window(1)  # torch.compile compiles here
                row[f"{label}_first_step_s"] = time.perf_counter() - t
                windows[label] = twin.window
            except Exception as e:  # torch.compile fails on some setups: report it, keep the rest
                notes.append(f"{label} failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
    try:
        timed, steps = _time_windows(windows, args)
    finally:
        for twin in workers:
            twin.close()
    step_s = timed["jaxml"]["median_s"]
    row.update({
        "step_ms": 1e3 * step_s, "step_ms_min": 1e3 * timed["jaxml"]["min_s"], "step_ms_max": 1e3 * timed["jaxml"]["max_s"],
        "cpu_ms": 1e3 * timed["jaxml"]["cpu_s"],
        "throughput": w.items_per_step / step_s, "flops_per_s": flops / step_s, "mfu": flops / step_s / peak,
        "steps_per_window": steps, "notes": notes,
    })
    for label in ("bare", "torch", "torch.compile"):
        if label in timed:
            row[f"{label}_ms"] = 1e3 * timed[label]["median_s"]
            row[f"jaxml_over_{label}"] = step_s / timed[label]["median_s"]
            row[f"jaxml_over_{label}_range"] = measure.paired_range(timed["jaxml"]["window_s"],
                                                                    timed[label]["window_s"])
            row[f"{label}_cpu_ms"] = 1e3 * timed[label]["cpu_s"]
            row[f"jaxml_over_{label}_cpu"] = timed["jaxml"]["cpu_s"] / timed[label]["cpu_s"]
    # Variant over default (not jaxml over the other, as above): below 1.0 the options help.
    row["xla_variants"] = [
        {"options": [list(p) for p in pairs], "ms": 1e3 * timed[label]["median_s"],
         "cpu_ms": 1e3 * timed[label]["cpu_s"], "ratio": timed[label]["median_s"] / step_s,
         "ratio_range": measure.paired_range(timed[label]["window_s"], timed["jaxml"]["window_s"]),
         "ratio_cpu": timed[label]["cpu_s"] / timed["jaxml"]["cpu_s"], "compile_s": variant_compile_s,
         "program_changed": changed}
        for label, pairs, variant_compile_s, changed in variants]
    return row


def _time_windows(windows: dict, args) -> tuple[dict, dict]:
    from benchmarks import measure

    for window in windows.values():
        window(1)  # warm-up
    steps = {name: measure.steps_for(window, args.window_s) for name, window in windows.items()}
    return measure.interleaved(windows, steps, args.windows), steps


_DEVICES = [1]  # how many devices the engine's step runs on (--cpu-devices)


def _engine_placement(w, config, example_batch):
    """The engine's placement of `w`'s experiment under `config` (its train step only) on the
    first `_DEVICES` devices: one, or the CPU's split (--cpu-devices), data parallel."""
    import jax

    from jaxml.train import parallel

    return parallel.setup(config.parallel, init_fn=functools.partial(w.experiment.init, config),
                          train_step=functools.partial(w.experiment.train_step, config), eval_step=None,
                          example_batch=example_batch, global_batch_size=config.data.batch_size,
                          devices=jax.devices()[:_DEVICES[0]])


def _jax_window(compiled, state, batch, key, holder: list | None = None):
    """Runs n steps of `compiled` on `batch`; the state lives in `holder` (shared by windows that
    take turns on one donated state)."""
    import jax

    holder = [state] if holder is None else holder

    def window(n: int):
        s = holder[0]
        for _ in range(n):
            s, metrics = compiled(s, batch, key)
        jax.block_until_ready(metrics)
        holder[0] = s

    return window


# ---- the input pipeline ----------------------------------------------------------------


def bench_pipeline(w, args) -> dict:
    """The engine's step fed by the real grain pipeline (through the loop's DeviceBatches) vs
    the same step on one cached device batch, interleaved."""
    import jax

    from benchmarks import measure
    from jaxml import data

    dc = w.config.data
    source = data.load_source(dc.name, dc.train_split, dc.data_dir, cache=dc.cache)
    iterator = iter(data.train_dataset(source, global_batch_size=dc.batch_size, seed=dc.seed,
                                       num_workers=dc.num_workers))
    example = next(iter(data.train_dataset(source, global_batch_size=dc.batch_size, seed=dc.seed)))
    placement = _engine_placement(w, w.config, example)
    key = jax.random.key(0)
    state = placement.init(key, example)
    cached = placement.place_batch(example)
    compiled, _, _ = measure.compile_timed(placement.train_step, state, cached, key)
    batches = data.DeviceBatches(iterator, placement.place_batch)
    holder = [state]  # one state, donated step to step, whichever window runs

    def pipeline_window(n):
        s = holder[0]
        for _ in range(n):
            s, metrics = compiled(s, next(batches), key)
        jax.block_until_ready(metrics)
        holder[0] = s

    windows = {"pipeline": pipeline_window, "cached": _jax_window(compiled, state, cached, key, holder)}
    for window in windows.values():
        window(2)
    n = measure.steps_for(windows["cached"], args.window_s)
    timed = measure.interleaved(windows, {"pipeline": n, "cached": n}, args.windows)
    row = {"family": w.name, "dataset": dc.name, "batch": dc.batch_size, "num_workers": dc.num_workers,
           "pipeline_steps_per_s": 1 / timed["pipeline"]["median_s"],
           "cached_steps_per_s": 1 / timed["cached"]["median_s"]}
    row["ratio"] = row["pipeline_steps_per_s"] / row["cached_steps_per_s"]
    row["ratio_range"] = measure.paired_range(timed["cached"]["window_s"], timed["pipeline"]["window_s"])
    row["ratio_cpu"] = timed["cached"]["cpu_s"] / timed["pipeline"]["cpu_s"]  # the same, in CPU time per step
    if w.name == "cnn" and not args.quick:
        row["loop_steps_per_s"] = _whole_loop(w, n)
    return row


def _whole_loop(w, steps_per_window: int) -> float:
    """Median steps/s of `jaxml.train.loop.train` itself (no eval), from its metrics log."""
    import types

    from jaxml.train import log, loop

    exp = types.ModuleType(f"{w.name}_no_eval")
    exp.get_config, exp.init, exp.train_step = w.experiment.get_config, w.experiment.init, w.experiment.train_step
    exp.eval_step, exp.report = None, None
    c = w.config.copy_and_resolve_references()
    c.train.log_every = steps_per_window
    c.train.steps = 6 * steps_per_window
    c.optim.warmup_steps = min(c.optim.warmup_steps, c.train.steps // 2)  # the schedule must fit the short run
    c.train.eval_every = 0
    c.checkpoint.every_steps = c.train.steps
    c.log.progress = False
    with tempfile.TemporaryDirectory() as workdir:
        loop.train(exp, c, workdir)
        rows = [r["perf/steps_per_sec"] for r in log.read_metrics(workdir) if "perf/steps_per_sec" in r]
    rows = sorted(rows[1:])  # the first window includes the compile
    return rows[len(rows) // 2]


# ---- output ----------------------------------------------------------------------------


def bench_sampling(args) -> list[dict]:
    """Per-image sampling time of experiments.diffusion's U-Net: DDPM over all levels vs DDIM's few steps.

    Guided (two U-Net passes per level), as the experiment's report samples; the params are
    an initialised model's (time does not depend on the weights). --quick: the tiny U-Net
    with 50 levels vs 10 DDIM steps.
    """
    import statistics

    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments import diffusion as exp

    config = exp.get_config("tiny" if args.quick else None)
    config.unlock()
    config.diffusion.num_steps = 50 if args.quick else 1000  # DDPM's classic chain, against DDIM's 50
    config.diffusion.ddim_steps = 10 if args.quick else 50
    batch_size = 8 if args.quick else 64
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (batch_size, 8, 8, 1), dtype=np.uint8),
             "label": rng.integers(0, 10, (batch_size,)), "mask": np.ones((batch_size,), np.float32)}
    state = jax.jit(functools.partial(exp.init, config))(jax.random.key(0), batch)
    labels = jnp.asarray(batch["label"], jnp.int32)
    rows = []
    for method, levels in (("ddim", config.diffusion.ddim_steps), ("ddpm", config.diffusion.num_steps)):
        sampler = functools.partial(exp.sample, config, method=method, guidance=2.0)
        t = time.perf_counter()
        jax.block_until_ready(sampler(state.ema_params, jax.random.key(0), labels))
        compile_s = time.perf_counter() - t
        wall, cpu = [], []
        for i in range(1 if args.quick else 3):
            t, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(sampler(state.ema_params, jax.random.key(i + 1), labels))
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        rows.append({"method": method.upper(), "levels": levels, "batch": batch_size, "compile_s": compile_s,
                     "ms_per_image": statistics.median(wall) / batch_size * 1e3,
                     "cpu_ms_per_image": statistics.median(cpu) / batch_size * 1e3})
    return rows


def _family_line(r: dict) -> str:
    s = (f"{r['family']:9} compile {r['compile_s']:6.1f} s  {r['step_ms']:8.2f} ms/step  "
         f"{r['throughput']:9.0f} {r['unit']}/s  {r['flops_per_s'] / 1e9:6.1f} GFLOP/s  MFU {r['mfu']:6.1%}")
    for label in ("bare", "torch", "torch.compile"):
        if f"{label}_ms" in r:
            s += (f"  {label} {r[f'{label}_ms']:.2f} ms (x{_ratio(r, f'jaxml_over_{label}', '.2f')}; "
                  f"CPU time x{r[f'jaxml_over_{label}_cpu']:.2f})")
    for v in r.get("xla_variants", []):
        s += (f"\n  xla {_variant_label(v['options'])}: {v['ms']:.2f} ms/step, x{_ratio(v, 'ratio', '.3f')} the "
              f"default step (CPU time x{v['ratio_cpu']:.3f}); optimised HLO {'changed' if v['program_changed'] else 'the same'}")
    return s + "".join(f"  [{n}]" for n in r["notes"])


def _f(x, fmt):
    return "" if x is None else format(x, fmt)


def _ratio(r: dict, key: str, fmt: str) -> str:
    """A ratio with the range of its paired windows in brackets (`measure.paired_range`)."""
    if r.get(key) is None:
        return ""
    low_high = r.get(f"{key}_range")
    return format(r[key], fmt) + (f" ({low_high[0]:{fmt}}-{low_high[1]:{fmt}})" if low_high else "")


def markdown(out: dict) -> str:
    m = out["machine"]
    peaks = m.get("peaks_measured") or [m["peak_flops"]]
    ends = (f", the higher of {' and '.join(f'{p / 1e9:.1f}' for p in m['peak_start_end'])} measured at the start "
            f"and the end" if m.get("peak_start_end") and len(peaks) == 1 else "")
    xla_flags = f"; XLA_FLAGS=`{m['xla_flags']}`" if m.get("xla_flags") else ""
    omp = f" (OMP_WAIT_POLICY={m['omp_wait_policy']})" if m.get("omp_wait_policy") else " (OpenMP defaults)"
    cpu = f"{m['cpu']}, " if m.get("cpu") else ""  # results written before the CPU was recorded lack it
    split = (f"; the CPU as {m['devices_used']} XLA devices, jaxml's step data parallel over them, YNNPACK "
             f"convolutions" if m.get("devices_used", 1) > 1 else "")
    lines = [f"Measured {out['when']} on {m['device_kind']} ({m['backend']}, {cpu}{m['cpu_count']} cores, "
             f"load average {', '.join(f'{x:.1f}' for x in (m['load_avg_start'] or []))} at the start"
             f"{f', the highest of {len(peaks)} merged runs' if len(peaks) > 1 else ''}), "
             f"jax {m['jax']}, Python {m['python']}; {m['torch']}{omp}; malloc: {m.get('malloc', 'glibc default')}"
             f"{xla_flags}{'; ' + m['threefry'] if m.get('threefry') else ''}{split}. Peak "
             f"{'/'.join(f'{p / 1e9:.1f}' for p in peaks)} GFLOP/s ({m['peak_source']}{ends}; each row's MFU "
             f"uses its own run's). Command: `{out['command']}`.", "",
             "| family | size | compile s | ms/step | throughput | GFLOP/step | GFLOP/s | MFU | peak mem MB "
             "| bare Flax ms | engine/bare | PyTorch eager ms | jaxml/eager | torch.compile ms | jaxml/compiled "
             "| CPU ms/step: jaxml / bare / eager / compiled |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["families"]:
        mem = r["memory"]["peak_bytes"]
        lines.append(
            f"| {r['family']} | {r['size']} ({r['dtype']}) | {r['compile_s']:.1f} | {r['step_ms']:.2f} | "
            f"{r['throughput']:.0f} {r['unit']}/s | {r['flops_per_step'] / 1e9:.3f} | {r['flops_per_s'] / 1e9:.1f} | "
            f"{r['mfu']:.1%} | {_f(mem and mem / 2**20, '.1f')} | {_f(r.get('bare_ms'), '.2f')} | "
            f"{_ratio(r, 'jaxml_over_bare', '.3f')} | {_f(r.get('torch_ms'), '.2f')} | "
            f"{_ratio(r, 'jaxml_over_torch', '.2f')} | {_f(r.get('torch.compile_ms'), '.2f')} | "
            f"{_ratio(r, 'jaxml_over_torch.compile', '.2f')} | "
            f"{' / '.join(_f(r.get(k), '.1f') or '-' for k in ('cpu_ms', 'bare_cpu_ms', 'torch_cpu_ms', 'torch.compile_cpu_ms'))} |")
    notes = [f"{r['family']}: {n}" for r in out["families"] for n in r["notes"]]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    variants = [(r, v) for r in out["families"] for v in r.get("xla_variants", [])]
    if variants:
        lines += ["", "| XLA options (per program) | family | ms/step | over the default step | in CPU time "
                  "| compile s | optimised HLO |", "|---|---|---|---|---|---|---|"]
        for r, v in variants:
            lines.append(f"| `{_variant_label(v['options'])}` | {r['family']} | {v['ms']:.2f} | "
                         f"{_ratio(v, 'ratio', '.3f')} | {v['ratio_cpu']:.3f} | {v['compile_s']:.1f} | "
                         f"{'changed' if v['program_changed'] else 'the same'} |")
    if out["pipeline"]:
        lines += ["", "| input pipeline | dataset | batch | grain steps/s | cached-batch steps/s | ratio "
                  "| ratio in CPU time | whole loop steps/s |", "|---|---|---|---|---|---|---|---|"]
        for p in out["pipeline"]:
            lines.append(f"| {p['family']} | {p['dataset']} | {p['batch']} | {p['pipeline_steps_per_s']:.1f} | "
                         f"{p['cached_steps_per_s']:.1f} | {_ratio(p, 'ratio', '.3f')} | {_f(p.get('ratio_cpu'), '.3f')} | "
                         f"{_f(p.get('loop_steps_per_s'), '.1f')} |")
    if out.get("sampling"):
        lines += ["", "| U-Net sampling (guided) | levels | batch | compile s | ms/image | CPU ms/image |",
                  "|---|---|---|---|---|---|"]
        for r in out["sampling"]:
            lines.append(f"| {r['method']} | {r['levels']} | {r['batch']} | {r['compile_s']:.1f} | "
                         f"{r['ms_per_image']:.2f} | {r['cpu_ms_per_image']:.2f} |")
    sc = out["scaling"]
    if sc:
        lines += ["", "| scaling | point | compile s (wall) | compile s (CPU) | ms/step | CPU ms/step | GFLOP/step "
                  "| GFLOP/s | temporaries MB |", "|---|---|---|---|---|---|---|---|---|"]
        for sweep, key, extra in (("batch", "batch", None), ("seq_len", "seq_len", "attention"),
                                  ("width", "width", None), ("depth", "depth", "layers"), ("remat", "remat", "layers")):
            for r in sc.get(sweep) or []:
                point = f"{key} {r[key]}" + (f", {r[extra]}" if extra and extra in r else "")
                lines.append(f"| {r['model']} | {point} | {r['compile_s']:.1f} | {_f(r.get('compile_cpu_s'), '.1f')} | "
                             f"{r['step_ms']:.2f} | {_f(r.get('cpu_ms'), '.2f')} | "
                             f"{r['gflops_per_step']:.3f} | {r['gflops_per_s']:.1f} | {_f(r.get('temp_mb'), '.1f')} |")
    lines += ["", (f"Load average at the end: {', '.join(f'{x:.1f}' for x in m['load_avg_end'])}. "
                   if m.get("load_avg_end") else "") +
              "Ratios come from windows interleaved in turn (PyTorch's in a worker process of its own), each after one untimed step of its own; absolute times drift with the machine's load. "
              "A ratio is that of the median window times; in brackets, the lowest and highest ratio of two "
              "windows timed back to back in the same round (a range that spans 1.0 is a tie)."]
    return "\n".join(lines)


def merge(directories: list[str]) -> dict:
    """One result from several runs' results.json: their families and pipelines in order, each
    scaling sweep from the last run that measured it; the machine of the first, with the load
    averages and commands of all."""
    runs = []
    for d in directories:
        with open(os.path.join(d, "results.json")) as f:
            runs.append(json.load(f))
    split = {r["machine"].get("devices_used", 1) for r in runs}
    if len(split) > 1:
        raise SystemExit(f"--merge: these runs split the CPU into different device counts {sorted(split)} "
                         f"(--cpu-devices); one table holds one setting")
    out = dict(runs[0], families=[], pipeline=[], scaling=None)
    out["command"] = " ; ".join(r["command"] for r in runs)
    loads = [r["machine"][k] for r in runs for k in ("load_avg_start", "load_avg_end") if r["machine"].get(k)]
    out["machine"] = dict(runs[0]["machine"], load_avg_start=[max(x[i] for x in loads) for i in range(3)] if loads else None,
                          load_avg_end=None, runs=len(runs), peaks_measured=[r["machine"]["peak_flops"] for r in runs])
    for r in runs:
        out["families"] += r["families"]
        out["pipeline"] += r["pipeline"]
        for sweep, rows in (r["scaling"] or {}).items():
            if rows:
                out["scaling"] = out["scaling"] or {}
                out["scaling"][sweep] = rows
    return out


def write(out: dict, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "results.json"), "w") as f:
        json.dump(out, f, indent=2, default=float)
    with open(os.path.join(directory, "results.md"), "w") as f:
        f.write(markdown(out) + "\n")
    if out["scaling"]:
        from benchmarks import scaling
        scaling.plot(os.path.join(directory, "scaling.png"), out["scaling"])


if __name__ == "__main__":
    main()
