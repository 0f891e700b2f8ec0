"""The benchmark suite runs end to end (quick, one tiny family) and writes valid results;
its peak table and the PyTorch twins' architectures are checked against jaxml's."""

import json

import flax.linen as nn
import jax
import pytest

from benchmarks import families, measure, run


def test_quick_run_writes_json_and_markdown(tmp_path):
    # Two variants of the engine's step: without YNNPACK (another program), and an option at its default.
    out = run.main(["--quick", "--only", "cnn", "--torch", "none", "--pipeline", "none", "--no-scaling",
                    "--windows", "1", "--out", str(tmp_path),
                    "--xla-options", "xla_cpu_experimental_ynn_fusion_type=", "xla_cpu_enable_fast_math=False"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["machine"]["jax"] == jax.__version__ and saved["machine"]["peak_flops"] > 0
    (row,) = saved["families"]
    assert row["family"] == "cnn" and row["batch"] == 16
    assert row["compile_s"] > 0 and row["step_ms"] > 0 and row["throughput"] > 0
    assert row["flops_per_step"] > 0 and 0 < row["mfu"] < 1.5, row
    assert row["memory"]["peak_bytes"] > 0
    # The bare Flax step ran beside the engine's: the overhead ratio is a real, positive number.
    assert row["bare_ms"] > 0 and row["jaxml_over_bare"] == pytest.approx(row["step_ms"] / row["bare_ms"])
    # One window each: the paired range is that one round's ratio, which is the ratio itself.
    assert row["jaxml_over_bare_range"] == pytest.approx([row["jaxml_over_bare"]] * 2)
    table = (tmp_path / "results.md").read_text()
    assert "| cnn |" in table and table == run.markdown(out) + "\n"
    ratio = row["jaxml_over_bare"]
    assert f"| {ratio:.3f} ({ratio:.3f}-{ratio:.3f}) |" in table
    no_ynn, default_valued = row["xla_variants"]
    assert no_ynn["options"] == [["xla_cpu_experimental_ynn_fusion_type", ""]] and no_ynn["program_changed"]
    assert default_valued["options"] == [["xla_cpu_enable_fast_math", False]]
    assert not default_valued["program_changed"]
    for v in (no_ynn, default_valued):
        assert v["ms"] > 0 and v["ratio"] == pytest.approx(v["ms"] / row["step_ms"])
        assert v["ratio_range"] == pytest.approx([v["ratio"]] * 2) and v["compile_s"] > 0
    assert f"| `xla_cpu_experimental_ynn_fusion_type=` | cnn | {no_ynn['ms']:.2f} |" in table
    assert "| `xla_cpu_enable_fast_math=False` | cnn |" in table and "| the same |" in table


def test_split_cpu_run_counts_every_devices_flops_and_is_never_merged_with_a_plain_one(tmp_path):
    from jaxml import runtime

    common = ["--quick", "--only", "cnn", "--torch", "none", "--pipeline", "none", "--no-scaling", "--no-sampling",
              "--windows", "1"]
    try:
        one = run.main(common + ["--out", str(tmp_path / "one")])
        two = run.main(common + ["--cpu-devices", "2", "--out", str(tmp_path / "two")])
    finally:
        runtime.multithreaded_convolutions()  # the split run turned the suite's setting off
    (r1,), (r2,) = one["families"], two["families"]
    assert one["machine"]["devices_used"] == 1 and two["machine"]["devices_used"] == 2
    assert "bare_ms" in r1 and "bare_ms" not in r2  # the bare step is one device's: no like-for-like there
    # XLA's cost analysis is per device: the split step's FLOPs are both halves', as one device's,
    # and the optimizer update each device repeats on the replicated params (9% of this tiny step).
    assert r1["flops_per_step"] <= r2["flops_per_step"] <= 1.15 * r1["flops_per_step"]
    assert "x 2 devices" in r2["flops_source"] and "the CPU as 2 XLA devices" in run.markdown(two)
    with pytest.raises(SystemExit, match="different device counts"):
        run.merge([str(tmp_path / "one"), str(tmp_path / "two")])
    for bad in (["--cpu-devices", "0"], ["--cpu-devices", "2", "--device", "gpu"]):
        with pytest.raises(SystemExit):  # argparse: a usage error
            run.main(bad)


def test_xla_option_variants_parse_and_bad_ones_stop_the_run_before_any_family():
    assert run.xla_variant("xla_a=True; xla_b=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE;xla_c=2") == (
        ("xla_a", True), ("xla_b", "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"), ("xla_c", 2))
    for bad in ("xla_a", "=1", " ; "):
        with pytest.raises(ValueError, match="expected"):
            run.xla_variant(bad)
    with pytest.raises(SystemExit, match="No such compile option: 'xla_cpu_enable_fast_mathh'"):
        run.main(["--quick", "--only", "cnn", "--torch", "none", "--no-scaling",
                  "--xla-options", "xla_cpu_enable_fast_mathh=True"])
    with pytest.raises(SystemExit):  # argparse: a usage error
        run.main(["--xla-options", "no_value"])


def test_program_text_ignores_where_the_program_was_traced_from():
    import re
    import types

    import jax.numpy as jnp

    compiled = jax.jit(lambda a: jnp.tanh(a).sum()).lower(jnp.ones(8)).compile()
    text = compiled.as_text()
    assert "stack_frame_id=" in text and "FileLocations" in text
    # The same program traced from elsewhere: other source lines and frame ids, nothing else.
    moved = re.sub(r"stack_frame_id=\d+", "stack_frame_id=77", re.sub(r"line=\d+", "line=999", text))
    assert moved != text
    assert measure.program_text(types.SimpleNamespace(as_text=lambda: moved)) == measure.program_text(compiled)
    other = jax.jit(lambda a: jnp.sin(a).sum()).lower(jnp.ones(8)).compile()
    assert measure.program_text(other) != measure.program_text(compiled)


def test_cpu_description_names_the_model_and_its_vector_units():
    intel = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n"
             "flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert measure.cpu_description(intel) == "Intel(R) Xeon(R) Processor; avx2 fma avx512f avx512_bf16 amx_tile amx_bf16"
    amd = "model name\t: AMD EPYC 7B13 64-Core Processor\nflags\t\t: fpu sse2 avx avx2 fma\n"
    assert measure.cpu_description(amd) == "AMD EPYC 7B13 64-Core Processor; avx2 fma"
    assert measure.cpu_description("CPU part\t: 0xd0c\nFeatures\t: fp asimd\n") == "0xd0c; asimd"
    assert measure.cpu_description() in run.markdown(_result())  # this machine's, in the table's header


def _result(**sections):
    """A minimal results dict for `run.markdown`: this machine's CPU, no rows but `sections`'."""
    return {"machine": {"device_kind": "cpu", "backend": "cpu", "cpu": measure.cpu_description(), "cpu_count": 2,
                        "load_avg_start": None, "jax": jax.__version__, "python": "3", "torch": "t",
                        "peak_flops": 1e11, "peak_source": "s"},
            "when": "now", "command": "c", "families": [], "pipeline": [], "scaling": None, **sections}


def test_paired_range_pairs_windows_of_the_same_round():
    # Round by round: 1.0 / 1.5, 2.0 / 1.4 (jaxml's window hit a slow spell), 1.2 / 1.2. Pairing the
    # windows by rank instead of by round would give (0.83, 1.33); in reverse order (0.71, 1.67).
    jaxml_s, torch_s = [1.0, 2.0, 1.2], [1.5, 1.4, 1.2]
    low, high = measure.paired_range(jaxml_s, torch_s)
    assert (low, high) == pytest.approx((1.0 / 1.5, 2.0 / 1.4))
    # The ratio of the medians (1.2 / 1.4) lies inside, as it must.
    assert low <= 1.2 / 1.4 <= high
    with pytest.raises(ValueError, match="same rounds, got 3 and 2"):
        measure.paired_range(jaxml_s, torch_s[:2])


def test_interleaved_windows_start_warm(monkeypatch):
    # A fake clock: a step costs 1.0 s, and the first step after a window of another process 3.0 s
    # more (the cold start measured after a PyTorch worker's window). "engine" and "bare" share a
    # process; "engine" always runs right after the worker's "torch", so only it (from the second
    # round on) and "torch" (after "bare") would pay if windows started cold.
    clock = {"now": 0.0, "last": None}

    def contender(process, step_s=1.0):
        def window(n):
            cold = clock["last"] not in (None, process)
            clock["now"] += n * step_s + (3.0 if cold else 0.0)
            clock["last"] = process
        return window

    monkeypatch.setattr(measure, "time", type("FakeTime", (), {"perf_counter": staticmethod(lambda: clock["now"]),
                                                              "process_time": staticmethod(lambda: clock["now"])}))
    windows = {"engine": contender("jax"), "bare": contender("jax"), "torch": contender("worker")}
    steps = {"engine": 4, "bare": 4, "torch": 4}
    warm = measure.interleaved(windows, steps, repeats=3)
    assert all(warm[name]["window_s"] == [1.0, 1.0, 1.0] for name in windows)
    assert warm["engine"]["cpu_s"] == warm["engine"]["median_s"] == 1.0
    clock["last"] = None
    cold = measure.interleaved(windows, steps, repeats=3, settle_steps=0)
    assert cold["engine"]["window_s"] == [1.0, 1.75, 1.75] and cold["bare"]["window_s"] == [1.0, 1.0, 1.0]
    assert cold["torch"]["window_s"] == [1.75, 1.75, 1.75]


def test_markdown_shows_each_ratio_with_its_paired_range():
    row = {"jaxml_over_torch": 1.034, "jaxml_over_torch_range": [0.97, 1.10], "ratio": 0.95}
    assert run._ratio(row, "jaxml_over_torch", ".2f") == "1.03 (0.97-1.10)"
    assert run._ratio(row, "ratio", ".3f") == "0.950"  # results written before the ranges
    assert run._ratio(row, "jaxml_over_bare", ".3f") == ""


def test_unknown_family_is_refused_with_the_choices():
    with pytest.raises(SystemExit, match="expected some of"):
        run.main(["--only", "cnn,alexnet", "--no-scaling"])
    with pytest.raises(ValueError, match="unknown family 'alexnet'"):
        families.workload("alexnet")


def test_a_measured_peak_is_measured_again_at_the_end_and_the_higher_counts(monkeypatch):
    # The start's matmul ran in a busy spell (half speed): the MFU must not read 0.8 / 0.5 > 1.
    rows = [{"family": "gpt", "flops_per_s": 0.8e11, "mfu": 0.8e11 / 0.5e11}]
    out = _result(families=rows)
    out["machine"].update(peak_flops=0.5e11, peak_source="measured float32 1024x1024 matmul on this CPU")
    monkeypatch.setattr(measure, "device_peak", lambda dtype: (1e11, "measured float32 1024x1024 matmul on this CPU"))
    run._remeasure_peak(out, "float32")
    assert out["machine"]["peak_flops"] == 1e11 and out["machine"]["peak_start_end"] == [0.5e11, 1e11]
    assert rows[0]["mfu"] == pytest.approx(0.8)
    assert "Peak 100.0 GFLOP/s (measured float32 1024x1024 matmul on this CPU, the higher of 50.0 and 100.0 " \
           "measured at the start and the end;" in run.markdown(dict(out, families=[]))
    # A slower end leaves the start's peak; a datasheet peak is never replaced.
    monkeypatch.setattr(measure, "device_peak", lambda dtype: (0.9e11, "measured float32 1024x1024 matmul on this CPU"))
    run._remeasure_peak(out, "float32")
    assert out["machine"]["peak_flops"] == 1e11 and rows[0]["mfu"] == pytest.approx(0.8)
    gpu = _result(families=[{"family": "gpt", "flops_per_s": 4e14, "mfu": 0.4}])
    gpu["machine"].update(device_kind="NVIDIA H100 80GB HBM3", peak_flops=989e12,
                          peak_source="datasheet bfloat16 peak of NVIDIA H100 80GB HBM3")
    run._remeasure_peak(gpu, "bfloat16")
    assert gpu["machine"]["peak_flops"] == 989e12 and "peak_start_end" not in gpu["machine"]


def test_measured_peak_takes_the_fastest_matmul_over_its_minimum_time(monkeypatch):
    from experiments import gpt

    calls = []
    real = gpt.time.perf_counter
    monkeypatch.setattr(gpt.time, "perf_counter", lambda: calls.append(1) or real())
    gpt.measured_peak_flops(size=64, repeats=2, min_seconds=0.05)
    # 2 repeats of 64x64 take microseconds: the loop ran on until 0.05 s had passed.
    assert len(calls) > 20


@pytest.mark.parametrize("kind, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12), ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H200", "bfloat16", 989e12), ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("NVIDIA A100-SXM4-80GB", "float32", 19.5e12), ("TPU v4", "bfloat16", 275e12),
    ("TPU v5 lite", "bfloat16", 197e12), ("TPU v5", "bfloat16", 459e12), ("TPU v6 lite", "bfloat16", 918e12),
    ("cpu", "float32", None)])
def test_datasheet_peaks(kind, dtype, peak):
    assert measure.datasheet_peak(kind, dtype) == peak


@pytest.mark.parametrize("name", families.FAMILIES)
def test_torch_twin_has_jaxmls_parameter_count(name):
    reason = "the PyTorch twins need torch (jaxml[bench]; CI installs it on 3.11, no CPU wheel for 3.12 here)"
    torch = pytest.importorskip("torch", reason=reason)
    twins = pytest.importorskip("benchmarks.torch_twins", reason=reason)
    w = families.workload(name, quick=True)
    shapes = jax.eval_shape(lambda r: w.experiment.init(w.config, r, w.batch), jax.random.key(0))
    jax_params = sum(x.size for x in jax.tree.leaves(nn.unbox(shapes.params)))
    model, _, _ = twins._twin(w, torch.device("cpu"))
    torch_params = sum(p.numel() for p in model.parameters())
    # nn.LSTM keeps two bias vectors per layer (input and recurrent) where jaxml's cell has one.
    extra = 4 * w.config.model.hidden * w.config.model.num_layers if name == "lstm" else 0
    assert torch_params == jax_params + extra


def test_quick_sampling_timing_ddpm_vs_ddim():
    import argparse

    rows = run.bench_sampling(argparse.Namespace(quick=True))
    ddim, ddpm = rows
    assert (ddim["method"], ddpm["method"]) == ("DDIM", "DDPM") and ddpm["levels"] > ddim["levels"]
    assert all(r["ms_per_image"] > 0 and r["cpu_ms_per_image"] >= 0 and r["compile_s"] > 0 for r in rows)
    assert "| DDPM | 50 |" in run.markdown(_result(sampling=rows))


def test_scaling_refuses_unknown_sweeps_and_devices():
    from benchmarks import scaling

    with pytest.raises(ValueError, match="unknown scaling sweeps \\['heads'\\]"):
        scaling.run(True, 1, 0.01, sweeps=("batch", "heads"))
    with pytest.raises(ValueError, match="device must be 'cpu' or 'gpu', got 'tpu'"):
        scaling.run(True, 1, 0.01, sweeps=("batch",), device="tpu")


@pytest.mark.slow  # two GPT and two U-Net train steps compiled with remat: ~30 s on 2 idle cores
def test_remat_rows_trade_memory_for_recompute_and_are_plotted(tmp_path):
    from benchmarks import scaling

    layers, width, length, batch = scaling.REMAT_GPT["quick"]
    rows = {}
    for policy in ("none", "full"):  # the sweep's own measurement, four of its points (each compiles)
        c = scaling._gpt_config(layers, width, length, batch, remat=policy)
        rows["gpt", policy] = {"model": "gpt quick", "remat": policy, "layers": "scan",
                               **scaling._time_step(scaling.gpt, c, scaling._tokens(c), 1, 0.01)}
        # The U-Net's residual blocks are unrolled: on jaxlib 0.10's CPU backend only
        # jaxml.models.remat's cotangent-tied form saves memory there (3.2 -> 2.8 MB at this size).
        rows["unet", policy] = scaling._unet_remat_point(policy, "cpu", True, 1, 0.01)
    # Saving only the block inputs holds fewer temporaries and recomputes the forward pass: more FLOPs.
    for model in ("gpt", "unet"):
        assert rows[model, "full"]["temp_mb"] < 0.95 * rows[model, "none"]["temp_mb"], rows
        assert rows[model, "full"]["gflops_per_step"] > rows[model, "none"]["gflops_per_step"]
    assert all(r["step_ms"] > 0 and r["cpu_ms"] > 0 for r in rows.values())
    curves = {name: [] for name in scaling.SIZES} | {"remat": list(rows.values())}
    scaling.plot(str(tmp_path / "scaling.png"), curves)
    assert (tmp_path / "scaling.png").stat().st_size > 10_000
    table = run.markdown(_result(scaling=curves))
    assert "| gpt quick | remat full, scan |" in table and "| unet ch8 mults 1, 16x8x8 | remat full, unrolled |" in table


@pytest.mark.parametrize("name", ["cnn", "gpt", "lstm", "unet"])
def test_data_parallel_train_step_moves_no_activations_between_devices(name):
    """The engine's train step on 8 devices, batch sharded: gradients are reduced (all-reduce) and
    nothing else crosses devices. On jaxlib 0.10, dense.matmul's layout-constrained kernel-gradient
    copy made XLA gather every Dense layer's activations to every device (1-9 all-gathers a step
    in every family) until it was limited to one device."""
    import functools

    import numpy as np

    from jaxml.train import parallel

    w = families.workload(name, quick=True)
    batch_size = 2 * jax.device_count()
    w.config.data.batch_size = batch_size
    batch = jax.tree.map(lambda a: np.resize(np.asarray(a), (batch_size,) + np.shape(a)[1:]), w.batch)
    placement = parallel.setup(w.config.parallel, init_fn=functools.partial(w.experiment.init, w.config),
                               train_step=functools.partial(w.experiment.train_step, w.config), eval_step=None,
                               example_batch=batch, global_batch_size=batch_size, devices=jax.devices())
    assert dict(placement.mesh.shape)["data"] == jax.device_count() > 1
    key = jax.random.key(0)
    state = placement.init(key, batch)
    hlo = placement.train_step.lower(state, placement.place_batch(batch), key).compile().as_text()
    moved = {op: hlo.count(op + "(") for op in ("all-gather", "all-to-all", "collective-permute", "reduce-scatter")}
    assert not any(moved.values()), moved
    assert "all-reduce(" in hlo


def test_pytorch_twin_runs_in_a_worker_process_of_its_own(tmp_path):
    pytest.importorskip("torch", reason="the PyTorch twins need torch (jaxml[bench]; CI installs it on 3.11)")
    from benchmarks import torch_worker

    twin = torch_worker.Twin("cnn", "cpu", True, "float32", compiled=False, keep_host_memory=True)
    try:
        w = families.workload("cnn", quick=True)
        shapes = jax.eval_shape(lambda r: w.experiment.init(w.config, r, w.batch), jax.random.key(0))
        assert twin.params == sum(x.size for x in jax.tree.leaves(nn.unbox(shapes.params)))
        cpu_s = twin.window(3)
        assert isinstance(cpu_s, float) and cpu_s > 0
    finally:
        twin.close()
    assert twin._proc.returncode == 0
    with pytest.raises(RuntimeError, match="exited with status"):  # its traceback goes to stderr
        torch_worker.Twin("alexnet", "cpu", True, "float32", compiled=False, keep_host_memory=True)
    # In a run, the twin's CPU time is the worker's (this process only waits for it meanwhile).
    out = run.main(["--quick", "--only", "cnn", "--torch", "cnn", "--torch-compile", "none", "--bare", "none",
                    "--pipeline", "none", "--no-scaling", "--no-sampling", "--windows", "2", "--out", str(tmp_path)])
    (row,) = out["families"]
    assert row["torch_ms"] > 0 and row["torch_params"] == twin.params
    assert row["torch_cpu_ms"] > 0.5 * row["torch_ms"], row  # a busy process: at least half a core
