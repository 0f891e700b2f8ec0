"""Initialise a model from another run's checkpoint: map parameter paths, load what fits, report the rest.

Transfer learning starts a new model (often with a new head) from an old one's weights.
`read_checkpoint` reads the params (and BatchNorm statistics) of a jaxml run's Orbax
checkpoint, whatever model wrote it; `load_into` fills a freshly initialised variables
tree from them by path: each source path is renamed by the first matching
`(regex, replacement)` rule (identity when none matches), a target path matched by a
`reinit` regex keeps its fresh initialisation (a new head), and the `Report` names every
path that was loaded, re-initialised, or left unused. A path present in both with
different shapes is an error naming the path and both shapes: nothing is loaded by halves.

Paths are '/'-joined with the collection first: `params/Conv_0/kernel`,
`batch_stats/BatchNorm_0/mean`. Experiments expose this as `config.init_from` (a workdir,
its `checkpoints/` directory or one step directory), `config.init_rename` and
`config.init_reinit`; the loop (`load_state`) fills the freshly initialised, already placed
state on the host side after `init`, each loaded array going straight into the sharding its
fresh counterpart has: the weights never pass through a traced function (a 124M-parameter
GPT-2 would otherwise be baked into the init program as constants). An experiment whose
weights come from elsewhere (GPT-2 safetensors) defines `init_source(config)`, returning
the flat 'params/a/b' -> array dict, or None for a jaxml checkpoint.
"""

import dataclasses
import functools
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxml.train import log, optim

COLLECTIONS = ("params", "batch_stats")  # what a train state holds that a new model can reuse


class ShapeMismatchError(ValueError):
    """A source and target path that map onto each other hold arrays of different shapes."""


@dataclasses.dataclass
class Report:
    """What `load_into` did with every path."""

    source: str
    loaded: list[str]  # target paths filled from the source
    reinitialised: list[str]  # target paths that kept their fresh initialisation
    unused: list[str]  # source paths (before renaming) that went nowhere

    def __str__(self) -> str:
        def lines(title, paths):
            return [f"  {title} ({len(paths)}):"] + [f"    {p}" for p in paths]
        return "\n".join([f"initialised from {self.source}:"] + lines("loaded", self.loaded)
                         + lines("re-initialised", self.reinitialised) + lines("unused", self.unused))


def add_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Add the `init_from`, `init_rename` and `init_reinit` keys to an experiment's config."""
    c.init_from = ""  # "" = train from scratch; else a jaxml workdir / checkpoint dir (see module docstring)
    # ((regex, replacement), ...) applied to source paths; the first whose regex matches renames it
    # (re.sub, once); a rename to "" drops the path.
    c.init_rename = ()
    # Regexes of target paths that keep their fresh initialisation even when the source has them.
    c.init_reinit = ()
    return c


def _is_url(path: str) -> bool:
    return "://" in path


def checkpoint_step_dir(path: str) -> str:
    """The step directory `path` names: a workdir (newest of checkpoints/), a checkpoints dir, or a
    step dir; local or a URL such as gs://bucket/run/checkpoints (through etils.epath, as Orbax)."""
    root = epath.Path(path if _is_url(path) else os.path.abspath(path))
    if (root / "state").is_dir():
        return str(root)
    directory = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []
    if not steps:
        raise FileNotFoundError(
            f"init_from={path!r}: expected a jaxml workdir (with checkpoints/<step>/state), a checkpoints "
            f"directory or a step directory, but found no checkpoint there")
    return str(directory / str(steps[-1]))


@functools.lru_cache(maxsize=4)
def _read(step_dir: str, mtime: float) -> dict:
    del mtime  # part of the cache key only: a rewritten checkpoint is read again
    # Some experiments read inside their traced `init` (distill's fixed teacher goes into the
    # state there): Orbax must still build concrete arrays, not tracers.
    with jax.ensure_compile_time_eval():
        state = ocp.StandardCheckpointer().restore(epath.Path(step_dir) / "state")
    flat = {}
    for collection in COLLECTIONS:
        if state.get(collection):
            flat.update(flatten(state[collection], collection))
    if not flat:
        raise ValueError(f"checkpoint {step_dir} holds no params")
    return flat


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
    """'collection/a/b' -> array for the params and batch_stats of the checkpoint at `path`."""
    step_dir = checkpoint_step_dir(path)
    return _read(step_dir, (epath.Path(step_dir) / "state").stat().mtime)


def flatten(tree, collection: str = "params") -> dict[str, np.ndarray]:
    """'<collection>/a/b' -> array: a params tree in the source form `load_into` reads."""
    paths = jax.tree.leaves(optim.param_paths(tree))
    return {f"{collection}/{p}": np.asarray(v) for p, v in zip(paths, jax.tree.leaves(nn.unbox(tree)))}


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    """The nested variables tree ({'params': {...}, 'batch_stats': {...}}) of a flat 'a/b/c' -> array dict."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _rename(path: str, rules) -> str:
    for pattern, replacement in rules:
        if re.search(pattern, path):
            return re.sub(pattern, replacement, path, count=1)
    return path


def _placed_like(array: np.ndarray, like):
    """`array` in `like`'s dtype, and in its sharding when `like` is a placed jax.Array (each
    process builds only its own shards, so this works on multi-host meshes too)."""
    if isinstance(like, jax.Array) and not isinstance(like, jax.core.Tracer):
        host = np.asarray(array).astype(like.dtype)
        return jax.make_array_from_callback(host.shape, like.sharding, lambda index: host[index])
    return jnp.asarray(array, dtype=like.dtype)


def load_into(target, source: dict[str, np.ndarray], rename=(), reinit=(), source_name: str = "checkpoint"):
    """(`target` with every mapped path loaded from `source`, Report). `target` is a variables
    tree ({'params': ..., 'batch_stats': ...}); flax partitioning boxes are kept, and a placed
    (sharded) target leaf gets its loaded value in the same sharding."""
    rename = tuple(tuple(r) for r in rename)
    for rule in rename:
        if len(rule) != 2 or not all(isinstance(x, str) for x in rule):
            raise ValueError(f"init_rename entries must be (regex, replacement) string pairs, got {rule!r}")
    mapped: dict[str, str] = {}  # new path -> source path
    unused = []
    for old in sorted(source):
        new = _rename(old, rename)
        if not new:
            unused.append(old)
        elif new in mapped:
            raise ValueError(f"init_rename maps both {mapped[new]!r} and {old!r} onto {new!r}")
        else:
            mapped[new] = old
    paths = optim.param_paths(target)
    target_paths = set(jax.tree.leaves(paths))
    for pattern in reinit:
        if not any(re.search(pattern, p) for p in target_paths):
            raise ValueError(f"init_reinit pattern {pattern!r} matches no target path; paths are e.g. "
                             f"{sorted(target_paths)[:8]}")
    loaded, fresh = [], []

    def fill(path, leaf):
        value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
        if path not in mapped or any(re.search(p, path) for p in reinit):
            fresh.append(path)
            return leaf
        array = source[mapped[path]]
        if tuple(array.shape) != tuple(value.shape):
            raise ShapeMismatchError(
                f"init_from: {path} has shape {tuple(value.shape)} in the model but {tuple(array.shape)} in "
                f"{source_name} (source path {mapped[path]}); re-initialise it with init_reinit "
                f"(e.g. a new head) or map it elsewhere with init_rename")
        loaded.append(path)
        new = _placed_like(array, value)
        return leaf.replace_boxed(new) if isinstance(leaf, nn.Partitioned) else new

    out = jax.tree.map(fill, paths, target, is_leaf=lambda x: isinstance(x, str))
    unused += sorted(mapped[p] for p in mapped if p not in target_paths or any(re.search(r, p) for r in reinit))
    return out, Report(source=source_name, loaded=sorted(loaded), reinitialised=sorted(fresh),
                       unused=sorted(unused))


def load_state(config: ml_collections.ConfigDict, state, source: dict | None = None):
    """`state` (a fresh TrainState, placed) with params and BatchNorm statistics loaded from
    `config.init_from`, its EMA (if any) starting at the loaded params; unchanged when
    init_from is "" (or the config has no such key)."""
    if not config.get("init_from"):
        return state
    variables = {"params": state.params}
    if state.batch_stats is not None:
        variables["batch_stats"] = state.batch_stats
    loaded = init_from_config(config, variables, source)
    ema = None if state.ema_params is None else jax.tree.map(jnp.copy, loaded["params"])
    return state.replace(params=loaded["params"], batch_stats=loaded.get("batch_stats"), ema_params=ema)


def init_from_config(config: ml_collections.ConfigDict, variables: dict, source: dict | None = None) -> dict:
    """`variables` loaded from `config.init_from` (unchanged when it is ""); logs the report.

    `source` overrides what is read (e.g. GPT-2 weights already mapped to jaxml paths).
    """
    if not config.init_from:
        return variables
    if source is None:
        source = read_checkpoint(config.init_from)
    out, report = load_into(variables, source, config.init_rename, config.init_reinit, source_name=config.init_from)
    log.info(str(report))  # once per run: the loop loads outside any trace
    return out
