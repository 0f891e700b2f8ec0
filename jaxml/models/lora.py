"""LoRA (Hu et al. 2021): low-rank adapters on the Dense / DenseGeneral layers of any Linen model.

No model is rewritten: `adapters(cfg)` is a context manager that intercepts the calls of
`nn.Dense` and `nn.DenseGeneral` (flax `nn.intercept_methods`) whose module path matches
one of `cfg.targets` and adds `(alpha / rank) * dropout(x) A B` to their output. A and B
are params `lora_a` / `lora_b` created next to the layer's kernel, so they are scanned,
sharded and checkpointed like any param (under `nn.scan` they get the stacked layer axis).
B starts at zero, so an adapted model computes exactly what its base does until trained.

    with lora.adapters(cfg):                      # around init and every apply
        variables = model.init(rng, x)
    optim.freeze = (lora.FREEZE_BASE,)            # train only the adapters
    merged = lora.merge(params, cfg)              # W + (alpha/rank) A B; apply without adapters

Shape letters: I the layer's contracted input size, O its output size, R the rank.
"""

import contextlib
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxml.train import optim

# A regex for optim.freeze: every param that is not an adapter (the base model) stays fixed.
FREEZE_BASE = r"^(?!.*/lora_[ab]$)"
_ADAPTER = re.compile(r"(^|/)lora_[ab]$")


def default_config() -> ml_collections.ConfigDict:
    """The `lora` config section; rank 0 means no adapters."""
    c = ml_collections.ConfigDict()
    c.rank = 0  # 0 = off
    c.alpha = 16.0  # the update is scaled by alpha / rank, so changing the rank keeps its size
    c.dropout = 0.0  # on the adapter's input only
    # Regexes searched in '/'-joined module paths (e.g. 'decoder/layers/block/attention/query').
    c.targets = ("attention/(query|value)$",)  # the paper's choice: W_q and W_v
    return c


def _check(cfg) -> None:
    if not (isinstance(cfg.rank, int) and cfg.rank > 0):
        raise ValueError(f"lora.rank must be an int > 0 to add adapters, got {cfg.rank!r}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"lora.dropout must be in [0, 1), got {cfg.dropout!r}")
    if not cfg.targets or not all(isinstance(t, str) for t in cfg.targets):
        raise ValueError(f"lora.targets must be a non-empty tuple of regexes, got {cfg.targets!r}")


def _contracted_axes(module: nn.Module, ndim: int) -> tuple[int, ...]:
    """The input axes a Dense / DenseGeneral contracts, as trailing negative indices."""
    if isinstance(module, nn.Dense):
        return (-1,)
    axes = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    axes = tuple(sorted(a if a < 0 else a - ndim for a in axes))
    if axes != tuple(range(-len(axes), 0)) or module.batch_dims:
        raise ValueError(f"LoRA supports DenseGeneral over trailing axes without batch_dims; "
                         f"{'/'.join(module.path)} has axis={module.axis}, batch_dims={module.batch_dims}")
    return axes


def _out_shape(module: nn.Module) -> tuple[int, ...]:
    return tuple(module.features) if isinstance(module.features, (tuple, list)) else (module.features,)


@contextlib.contextmanager
def adapters(cfg: ml_collections.ConfigDict, *, train: bool = False):
    """Inside this context, matching Dense / DenseGeneral layers carry LoRA adapters.

    `train=True` applies `cfg.dropout` to the adapters' input (needs a "dropout" rng).
    A pattern that matches no layer is an error once the model has been called.
    """
    _check(cfg)
    patterns = [re.compile(t) for t in cfg.targets]
    matched: set[str] = set()
    seen: list[str] = []
    scale = cfg.alpha / cfg.rank

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral)):
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        seen.append(path)
        hits = [p.pattern for p in patterns if p.search(path)]
        if not hits:
            return next_fun(*args, **kwargs)
        matched.update(hits)
        y = next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        axes = _contracted_axes(module, x.ndim)
        in_size = math.prod(x.shape[a] for a in axes)
        out_shape = _out_shape(module)
        a_IxR = module.param("lora_a", nn.initializers.he_uniform(), (in_size, cfg.rank), module.param_dtype)
        b_RxO = module.param("lora_b", nn.initializers.zeros, (cfg.rank, math.prod(out_shape)), module.param_dtype)
        x_NxI = x.reshape(x.shape[: x.ndim - len(axes)] + (in_size,))
        if train and cfg.dropout > 0:
            keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - cfg.dropout, x_NxI.shape)
            x_NxI = jnp.where(keep, x_NxI / (1.0 - cfg.dropout), 0.0)
        dtype = module.dtype or x.dtype
        delta = (x_NxI.astype(dtype) @ a_IxR.astype(dtype)) @ b_RxO.astype(dtype)
        return y + (scale * delta).reshape(y.shape).astype(y.dtype)

    with nn.intercept_methods(intercept):
        yield
    unmatched = [p.pattern for p in patterns if p.pattern not in matched]
    if seen and unmatched:
        raise ValueError(f"lora.targets {unmatched} match no Dense layer; layer paths are e.g. "
                         f"{sorted(set(seen))[:8]}")


def is_adapter(path: str) -> bool:
    """True for the '/'-joined path of a lora_a / lora_b param."""
    return bool(_ADAPTER.search(path))


def count(params) -> int:
    """Number of adapter parameters in `params`."""
    flat = _flat(params)
    return sum(int(np.prod(v.shape)) for k, v in flat.items() if is_adapter(k))


def merge(params, cfg: ml_collections.ConfigDict):
    """Params without adapters whose kernels are W + (alpha/rank) A B: the same function, no extra cost."""
    scale = cfg.alpha / cfg.rank

    def walk(node):
        if not isinstance(node, dict):
            return node
        out = {k: walk(v) for k, v in node.items() if k not in ("lora_a", "lora_b")}
        if "lora_a" in node:
            kernel = nn.unbox(node["kernel"])
            a, b = nn.unbox(node["lora_a"]), nn.unbox(node["lora_b"])
            # A: (..., I, R), B: (..., R, O); leading axes are scanned layers.
            delta = jnp.einsum("...ir,...ro->...io", a, b) * scale
            new = kernel + delta.reshape(kernel.shape).astype(kernel.dtype)
            out["kernel"] = node["kernel"].replace_boxed(new) if isinstance(node["kernel"], nn.Partitioned) else new
        return out

    return walk(dict(params))


def adapter_params(params) -> dict:
    """The lora_a / lora_b leaves only, keyed by '/'-joined path."""
    return {k: np.asarray(nn.unbox(v)) for k, v in _flat(params).items() if is_adapter(k)}


def save(directory: str, params) -> None:
    """Write only the adapters to `directory` (an Orbax checkpoint of arrays; no pickle)."""
    flat = adapter_params(params)
    if not flat:
        raise ValueError("save: these params hold no lora_a / lora_b adapters")
    checkpointer = ocp.StandardCheckpointer()
    # '/' is Orbax's own path separator: keys are stored with '.' between path components.
    checkpointer.save(os.path.abspath(directory), {k.replace("/", "."): v for k, v in flat.items()}, force=True)
    checkpointer.wait_until_finished()


def load(directory: str, params):
    """`params` with its adapters replaced by those saved in `directory`; paths and shapes must match."""
    stored = ocp.StandardCheckpointer().restore(os.path.abspath(directory))
    stored = {k.replace(".", "/"): np.asarray(v) for k, v in stored.items()}
    have = adapter_params(params)
    missing, extra = sorted(set(have) - set(stored)), sorted(set(stored) - set(have))
    wrong = [f"{k}: saved {stored[k].shape}, model {have[k].shape}" for k in sorted(set(have) & set(stored))
             if stored[k].shape != have[k].shape]
    if missing or extra or wrong:
        raise ValueError(f"LoRA adapters in {directory} do not fit this model: missing {missing[:6]}, "
                         f"not in model {extra[:6]}, shape mismatch {wrong[:6]}")
    paths = optim.param_paths(params)
    return jax.tree.map(lambda p, v: jnp.asarray(stored[p], dtype=nn.unbox(v).dtype) if p in stored else v,
                        paths, params, is_leaf=lambda x: isinstance(x, str))


def _flat(params) -> dict:
    return dict(zip(jax.tree.leaves(optim.param_paths(params)),
                    jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))))
