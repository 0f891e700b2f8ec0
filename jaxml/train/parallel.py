"""Devices: the mesh, shardings from logical axis rules, and the jit / pmap step wrappers.

The loop never branches on the parallel mode: `setup` returns a `Placement` whose
functions place states and batches on devices and run the compiled steps, for `jit`
(one SPMD program over a `Mesh`, the default) or `pmap` (classic replicated data
parallelism). Checkpoints always hold the plain, unreplicated state, so a run can switch
modes or device counts between restarts.
"""

import contextlib
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxml import runtime

PyTree = Any
MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes
PMAP_AXIS = "batch"


def default_config() -> ml_collections.ConfigDict:
    """Every parallelism key with its default: all devices on `data`, jit mode."""
    c = ml_collections.ConfigDict()
    c.mode = "jit"  # jit | pmap
    # Mesh axis sizes; -1 takes the devices the others leave (exactly one axis may be -1).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # Logical axis name -> mesh axes. Modules name their parameter axes
    # (nn.with_logical_partitioning); names absent here are replicated.
    c.rules = (
        ("batch", BATCH_AXES),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("vocab", "tensor"),
        ("conv_out", "tensor"),
    )
    # XLA compile options for the train and eval steps (jit mode), as (name, value) pairs: the
    # DebugOptions names XLA_FLAGS takes, without "--", e.g.
    # (("xla_cpu_experimental_ynn_fusion_type", "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"),).
    # Per program, so they need no restart and A/B in one process; enum values by full name.
    c.xla_options = ()
    return c


def check_xla_options(options, mode: str = "jit") -> dict:
    """`config.parallel.xla_options` as a dict; ValueError naming what was expected when an
    entry is not a (name, value) pair of an `xla_...` string and a str/bool/int/float, a name
    comes twice, or options are set in pmap mode (jax.pmap takes none: use XLA_FLAGS)."""
    def bad(why):
        return ValueError(f"config.parallel.xla_options={options!r} is invalid: expected {why}")

    if isinstance(options, (str, bytes)) or not isinstance(options, (tuple, list)):
        raise bad("a tuple of (name, value) pairs, e.g. (('xla_cpu_enable_fast_math', False),)")
    out = {}
    for entry in options:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)
                and entry[0].startswith("xla_") and isinstance(entry[1], (str, bool, int, float))):
            raise bad(f"(name, value) pairs of an XLA option name starting 'xla_' (no '--') and a "
                      f"str, bool, int or float value; got the entry {entry!r}")
        if entry[0] in out:
            raise bad(f"each option once; {entry[0]!r} comes twice")
        out[entry[0]] = entry[1]
    if out and mode != "jit":
        raise bad(f"() with parallel.mode={mode!r}: jax.pmap compiles without per-program options "
                  f"(set them in XLA_FLAGS, or use mode='jit')")
    return out


def compiler_options(cfg: ml_collections.ConfigDict, platform: str) -> dict:
    """The XLA compile options of the engine's jit-mode steps on `platform`: jaxml.runtime's
    (`step_compiler_options`) with `cfg.xla_options` over them. XLA parses them here, on an
    empty program, so a misspelt name or a value it rejects fails before the model compiles."""
    own = check_xla_options(cfg.get("xla_options", ()), cfg.mode)
    options = {**runtime.step_compiler_options(platform), **own}
    if own:
        try:
            jax.jit(lambda: 0, compiler_options=options).lower().compile()
        except Exception as e:  # jax.errors.JaxRuntimeError: XLA's INVALID_ARGUMENT, with its reason
            raise ValueError(f"config.parallel.xla_options={cfg.xla_options!r} is invalid: XLA rejects "
                             f"them: {e}. Expected XLA DebugOptions names (as in XLA_FLAGS, without '--') "
                             f"with values of their type; enum values by full name") from e
    return options


def make_mesh(cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all) with sizes from `cfg.mesh`."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(cfg.mesh[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"parallel.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
        raise ValueError(
            f"parallel.mesh {dict(zip(MESH_AXES, sizes))} does not fit {len(devices)} devices: "
            f"the product of the fixed axes ({known}) must divide the device count")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"parallel.mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
            f"{len(devices)} are available")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_size(global_batch: int, mesh: Mesh, mode: str, key: str = "data.batch_size") -> None:
    """Fail early, with the numbers, when the global batch (config `key`) does not split evenly."""
    dp = mesh.size if mode == "pmap" else data_parallel_size(mesh)
    if global_batch % dp or global_batch % jax.process_count():
        raise ValueError(
            f"{key}={global_batch} (the global batch) must be divisible by the "
            f"data-parallel size {dp} and the process count {jax.process_count()}; "
            f"e.g. use {dp * max(1, global_batch // dp)}")


def process_rows(mesh: Mesh, global_batch: int, mode: str, key: str = "data.batch_size") -> np.ndarray:
    """The rows of a global batch that this process's devices hold, increasing: what its
    input pipeline reads, so that the placed global batch is row for row the one a single
    process builds (and per-example random numbers, drawn by row, are the same too).

    Usually the contiguous block [p*G/P, (p+1)*G/P), but a mesh built for a TPU slice's
    topology may give a host's devices rows that are not contiguous; this follows the mesh.
    """
    check_batch_size(global_batch, mesh, mode, key)
    if mode == "pmap":  # single-process: pmap's batch is split over the mesh's devices in order
        return np.arange(global_batch)
    held = NamedSharding(mesh, P(BATCH_AXES)).addressable_devices_indices_map((global_batch,))
    return np.unique(np.concatenate([np.arange(global_batch)[index] for index in held.values()]))


# ---- pmap's axis, visible to step functions while they are traced ----------------------

_pmap_axis: list[str] = []


@contextlib.contextmanager
def _tracing_under_pmap():
    _pmap_axis.append(PMAP_AXIS)
    try:
        yield
    finally:
        _pmap_axis.pop()


def pmap_axis_name() -> str | None:
    """The pmap axis while a step is traced under pmap, else None (for BatchNorm's axis_name)."""
    return _pmap_axis[-1] if _pmap_axis else None


def mean_over_devices(tree: PyTree) -> PyTree:
    """Average across pmap devices (gradients, statistics); identity under jit, where XLA
    already reduces over the global batch."""
    name = pmap_axis_name()
    return tree if name is None else jax.lax.pmean(tree, name)


# ---- placement --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Placement:
    """How states and batches live on devices, and the compiled steps that use them."""

    mesh: Mesh
    mode: str
    init: Callable[[jax.Array, PyTree], PyTree]  # (rng, local numpy batch) -> placed state
    abstract_state: PyTree  # ShapeDtypeStructs with shardings: the restore target
    place_state: Callable[[PyTree], PyTree]  # plain state -> placed state
    plain_state: Callable[[PyTree], PyTree]  # placed state -> plain state (for saving)
    place_batch: Callable[[PyTree], PyTree]  # local numpy batch -> device batch
    train_step: Callable  # (state, batch, key) -> (state, metrics); rng = fold_in(key, step)
    eval_step: Callable | None  # (state, batch) -> summed metrics of the global batch


def _fold_step(fn):
    def step(state, batch, key):
        return fn(state, batch, jax.random.fold_in(key, state.step))
    return step


def state_shardings(init_fn, batch, mesh: Mesh, rules) -> tuple[PyTree, PyTree]:
    """(shardings, abstract state) of `init_fn(rng, batch)` on `mesh`, from shapes alone
    (`batch` may be abstract: jaxml.preflight compiles for devices it does not have)."""
    boxed = jax.eval_shape(init_fn, jax.random.key(0), batch)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings)
    return shardings, abstract


def jit_train_step(train_step, shardings, batch_sharding: NamedSharding, options: dict | None = None):
    """The jit-mode train step: state donated, rng folded with the step, metrics replicated;
    `options`: XLA compile options (`compiler_options`)."""
    replicated = NamedSharding(batch_sharding.mesh, P())
    return jax.jit(_fold_step(train_step), donate_argnums=(0,),
                   in_shardings=(shardings, batch_sharding, replicated),
                   out_shardings=(shardings, replicated), compiler_options=options or None)


def setup(cfg: ml_collections.ConfigDict, *, init_fn, train_step, eval_step, example_batch,
          global_batch_size: int, devices=None) -> Placement:
    """Build the mesh and compile-ready wrappers for `cfg.mode` (cfg is `config.parallel`)."""
    mesh = make_mesh(cfg, devices)
    check_batch_size(global_batch_size, mesh, cfg.mode)
    rules = tuple(tuple(r) for r in cfg.rules)
    batch_sharding = NamedSharding(mesh, P(BATCH_AXES))
    replicated = NamedSharding(mesh, P())

    def place_global(local_batch):
        if jax.process_count() == 1:  # the local batch is the global one: 66 us a CNN batch instead of 169
            return jax.device_put(jax.tree.map(np.asarray, local_batch), batch_sharding)
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(batch_sharding, np.asarray(x)),
            local_batch)

    shardings, abstract = state_shardings(init_fn, place_global(example_batch), mesh, rules)

    def unboxed_init(rng, batch):
        return nn.unbox(init_fn(rng, batch))

    if cfg.mode == "jit":
        options = compiler_options(cfg, mesh.devices.flat[0].platform)
        jit_init = jax.jit(unboxed_init, out_shardings=shardings)
        step = jit_train_step(train_step, shardings, batch_sharding, options)
        evaluate = None if eval_step is None else jax.jit(
            eval_step, in_shardings=(shardings, batch_sharding), out_shardings=replicated,
            compiler_options=options or None)
        return Placement(
            mesh=mesh, mode="jit", abstract_state=abstract,
            init=lambda rng, local_batch: jit_init(rng, place_global(local_batch)),
            place_state=lambda s: jax.device_put(s, shardings),
            plain_state=lambda s: s,
            place_batch=place_global,
            train_step=step, eval_step=evaluate)

    if cfg.mode == "pmap":
        check_xla_options(cfg.get("xla_options", ()), "pmap")
        return _pmap_placement(mesh, abstract, unboxed_init, train_step, eval_step)
    raise ValueError(f"parallel.mode must be 'jit' or 'pmap', got {cfg.mode!r}")


def _pmap_placement(mesh, abstract, unboxed_init, train_step, eval_step) -> Placement:
    devices = list(mesh.devices.flat)
    n = len(devices)
    if jax.process_count() > 1:
        raise NotImplementedError("parallel.mode='pmap' is single-process here; use 'jit' on multi-host slices")

    # An identity pmap puts one copy of every leaf on every device, as pmap's inputs need.
    to_devices = jax.pmap(lambda x: x, devices=devices)

    def replicate(state):
        return to_devices(jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), state))

    def split(local_batch):
        return jax.tree.map(lambda x: np.asarray(x).reshape((n, -1) + np.shape(x)[1:]), local_batch)

    def device_step(state, batch, key):
        with _tracing_under_pmap():
            key = jax.random.fold_in(key, jax.lax.axis_index(PMAP_AXIS))
            state, metrics = _fold_step(train_step)(state, batch, key)
            return state, jax.lax.pmean(metrics, PMAP_AXIS)

    def device_eval(state, batch):
        with _tracing_under_pmap():
            return jax.lax.psum(eval_step(state, batch), PMAP_AXIS)

    pstep = jax.pmap(device_step, axis_name=PMAP_AXIS, in_axes=(0, 0, None), donate_argnums=(0,),
                     devices=devices)
    peval = None if eval_step is None else jax.pmap(device_eval, axis_name=PMAP_AXIS, devices=devices)
    jit_init = jax.jit(unboxed_init)
    first = lambda tree: jax.tree.map(lambda x: x[0], tree)
    return Placement(
        mesh=mesh, mode="pmap", abstract_state=jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract),
        init=lambda rng, local_batch: replicate(jax.device_get(jit_init(rng, local_batch))),
        place_state=lambda s: replicate(jax.device_get(s)),
        plain_state=lambda s: jax.device_get(first(s)),
        place_batch=split,
        train_step=lambda s, b, k: (lambda out: (out[0], first(out[1])))(pstep(s, b, k)),
        eval_step=None if peval is None else (lambda s, b: first(peval(s, b))))
