"""Ahead-of-time preflight: compile an experiment's train step for a target topology
without that hardware and print per-device memory, FLOPs per step and compile time.

    python -m experiments.gpt --preflight --topology=v4-32

TPU targets are described offline by libtpu's compile-only devices
(`jax.experimental.topologies.get_topology_desc`, needs `pip install libtpu`, which the
`tpu` extra brings); XLA then compiles the real TPU program. A target that cannot be
described offline (GPUs: compiling for them needs the CUDA plugin *and* a GPU; TPUs
without libtpu) is said to be so, and the step is compiled for the same number of fake
CPU devices with the same mesh and shardings instead: the per-device sizes of
parameters, optimizer state and batch are those of the target, temporaries and FLOPs are
the CPU compiler's.
"""

import dataclasses
import functools
import glob
import os
import re
import time
import types

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxml import data as data_lib
from jaxml.train import parallel, selection

# Chips -> libtpu topology name. v5e/v6e slices are 2D and named by chips (v5e-16 = 16 chips);
# v4/v5p slices are 3D and named by TensorCores, two per chip (v4-32 = 16 chips).
_TOPOLOGY_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_TOPOLOGY_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
                512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_TPU_KINDS = {"v5e": (1, _TOPOLOGY_2D), "v5litepod": (1, _TOPOLOGY_2D), "v6e": (1, _TOPOLOGY_2D),
              "v4": (2, _TOPOLOGY_3D), "v5p": (2, _TOPOLOGY_3D)}
EXAMPLES = "v5e-16, v4-32, v5p-8, v6e-8, v5e:4x4 (libtpu's name), 8xH100, 16xA100, cpu:8"


@dataclasses.dataclass(frozen=True)
class Target:
    """A parsed --topology: the platform, how many devices, and libtpu's topology name (TPU)."""

    spec: str
    platform: str  # tpu | gpu | cpu
    num_devices: int
    tpu_topology: str | None = None  # e.g. "v4:2x2x4"
    kind: str = ""  # v4, H100, ...


def parse_topology(spec: str) -> Target:
    """`v5e-16`, `v4-32`, `v5e:4x4`, `8xH100`, `cpu:8` -> Target; anything else is an error with examples."""
    s = spec.strip()
    if m := re.fullmatch(r"cpu:(\d+)", s):
        return Target(spec, "cpu", int(m[1]), kind="cpu")
    if m := re.fullmatch(r"(\d+)x([A-Za-z][A-Za-z0-9]*)", s):
        return Target(spec, "gpu", int(m[1]), kind=m[2].upper())
    if m := re.fullmatch(r"(v5e|v6e|v4|v5p|v5litepod):(\d+(?:x\d+){1,2})", s):
        kind = "v5e" if m[1] == "v5litepod" else m[1]
        return Target(spec, "tpu", int(np.prod([int(d) for d in m[2].split("x")])), f"{kind}:{m[2]}", kind)
    if m := re.fullmatch(r"(v5e|v6e|v4|v5p|v5litepod)-(\d+)", s):
        kind = "v5e" if m[1] == "v5litepod" else m[1]
        per_chip, names = _TPU_KINDS[m[1]]
        chips = int(m[2]) // per_chip
        if int(m[2]) % per_chip or chips not in names:
            sizes = ", ".join(f"{m[1]}-{c * per_chip}" for c in names)
            raise ValueError(f"--topology={spec}: no {m[1]} slice of that size; known sizes: {sizes}")
        return Target(spec, "tpu", chips, f"{kind}:{names[chips]}", kind)
    raise ValueError(f"--topology={spec!r} is not a topology I know; examples: {EXAMPLES}")


def prepare(target: Target) -> None:
    """Before JAX's backends start: enough fake CPU devices for the fallback (and cpu:N)."""
    if target.platform == "tpu" and _tpu_devices(target, quiet=True) is not None:
        return
    try:
        jax.config.update("jax_num_cpu_devices", target.num_devices)
    except RuntimeError:  # the CPU backend already started; `devices` checks whether it has enough
        pass


def _offline_tpu_env(target: Target) -> None:
    """On a machine without TPUs, tell libtpu there is no slice to discover (it would query the
    GCE metadata server and log errors about worker hostnames and accelerator type)."""
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    per_chip, _ = _TPU_KINDS[target.kind]
    generation = "v5litepod" if target.kind == "v5e" else target.kind
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{generation}-{target.num_devices * per_chip}")


@functools.cache
def _tpu_devices(target: Target, quiet: bool = False):
    from jax.experimental import topologies

    _offline_tpu_env(target)
    # v4 / v5p chips have two TensorCores that JAX drives as one device ("megacore").
    options = dict(chip_config_name="megacore") if target.kind in ("v4", "v5p") else {}
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=target.tpu_topology, **options).devices
    except Exception as e:  # no libtpu (ModuleNotFoundError / RuntimeError), or a name it rejects
        if not quiet:
            print(f"note: libtpu cannot describe {target.tpu_topology} here ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200]}); `pip install libtpu` (or jaxml[tpu]) compiles for the real TPU")
        return None


def devices(target: Target) -> tuple[list, str]:
    """(devices to compile for, how they were obtained), falling back to fake CPU devices."""
    if target.platform == "tpu":
        found = _tpu_devices(target)
        if found is not None:
            return list(found), f"compile-only {found[0].device_kind} devices from libtpu ({target.tpu_topology})"
        why = f"{target.spec} cannot be described offline without libtpu"
    elif target.platform == "gpu":
        why = (f"{target.spec} cannot be described offline: compiling for a GPU needs jax's CUDA plugin and "
               f"the GPU itself")
    else:
        why = None
    cpus = jax.devices("cpu")
    if len(cpus) < target.num_devices:
        raise RuntimeError(
            f"the CPU fallback for {target.spec} needs {target.num_devices} CPU devices, JAX has {len(cpus)}: "
            f"run preflight in a fresh process (it sets jax_num_cpu_devices) or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={target.num_devices}")
    how = f"{target.num_devices} fake CPU devices"
    if why:
        how += (f" instead ({why}); parameter/optimizer/batch sizes per device are the target's, "
                f"temporaries and FLOPs are the CPU compiler's")
    return cpus[:target.num_devices], how


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def run(experiment: types.ModuleType, config: ml_collections.ConfigDict, spec: str) -> dict:
    """Compile `experiment`'s train step for topology `spec`; print and return the figures."""
    target = parse_topology(spec)
    devs, how = devices(target)
    name = experiment.__spec__.name if experiment.__spec__ is not None else experiment.__name__
    print(f"preflight: {name} on {spec}: {len(devs)} devices, {how}", flush=True)

    dc = config.data
    source = data_lib.load_source(dc.name, selection.resolve_splits(dc).train, data_dir=dc.data_dir, cache=False)
    example = next(iter(data_lib.train_dataset(source, global_batch_size=dc.batch_size, seed=dc.seed)))
    mesh = parallel.make_mesh(config.parallel, devs)
    if config.parallel.mode != "jit":
        print("note: preflight compiles the jit (SPMD) step; parallel.mode=pmap runs the same per-device math")
    parallel.check_batch_size(dc.batch_size, mesh, "jit")
    batch_sharding = NamedSharding(mesh, P(parallel.BATCH_AXES))
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=batch_sharding),
                         example)
    init_fn = functools.partial(experiment.init, config)
    shardings, abstract_state = parallel.state_shardings(init_fn, batch, mesh, tuple(tuple(r) for r in config.parallel.rules))
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                               sharding=NamedSharding(mesh, P()))
    step = parallel.jit_train_step(functools.partial(experiment.train_step, config), shardings, batch_sharding,
                                   parallel.compiler_options(config.parallel, devs[0].platform))

    t0 = time.perf_counter()
    lowered = step.lower(abstract_state, batch, key)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()

    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params))
    mesh_shape = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
    print(f"mesh: {mesh_shape}; global batch {dc.batch_size} ({dc.batch_size // parallel.data_parallel_size(mesh)} "
          f"per data-parallel device); {params / 1e6:.3f} M parameters")
    figures = dict(topology=spec, devices=len(devs), how=how, parameters=params, flops_per_device=flops,
                   flops_total=flops * len(devs), lower_s=t1 - t0, compile_s=t2 - t1)
    if mem is not None:
        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
        figures.update(arguments_bytes=mem.argument_size_in_bytes, outputs_bytes=mem.output_size_in_bytes,
                       aliased_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
                       code_bytes=mem.generated_code_size_in_bytes, peak_bytes=peak)
        print(f"per-device memory: {_mb(peak)} (arguments {_mb(mem.argument_size_in_bytes)}, outputs "
              f"{_mb(mem.output_size_in_bytes)}, donated/aliased {_mb(mem.alias_size_in_bytes)}, temporaries "
              f"{_mb(mem.temp_size_in_bytes)}, code {_mb(mem.generated_code_size_in_bytes)})")
    else:
        print("per-device memory: the compiler gives no memory analysis for this target")
    print(f"FLOPs per step: {flops:.4g} per device, {flops * len(devs):.4g} in all")
    if "model" in config and config.model.get("scan_layers", False) and "num_layers" in config.model:
        print("note: XLA counts a scanned loop body once, so with model.scan_layers=True the FLOPs are about "
              f"1/{config.model.num_layers} of the layers' true count (--config.model.scan_layers=false counts all)")
    print(f"compile time: {t2 - t1:.2f} s (lowering {t1 - t0:.2f} s)", flush=True)
    return figures
