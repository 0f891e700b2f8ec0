"""Rematerialisation by config: which of a block's activations the backward pass keeps, and which it recomputes.

    "none"                              keep everything (fastest, most memory)
    "full"                              keep only each block's inputs, recompute the rest
    "dots_saveable"                     keep matmul outputs, recompute the cheap elementwise ops
    "dots_with_no_batch_dims_saveable"  keep only weight matmuls (not attention's batched q.k / p.v)

The last two are `jax.checkpoint_policies` of those names. `True` / `False` mean "full" / "none".

On jaxlib < 0.11's CPU backend a policy saves memory only in scanned stacks: outside a loop
XLA merges the recomputation back into the forward pass (common subexpressions; the
optimisation barriers `prevent_cse` adds do not stop it there), so the backward pass keeps
every activation anyway. The unrolled 4-layer GPT of the benchmark's remat sweep kept 137.7
MB of temporaries with "full" as with "none" (scanned: 44.9 against 150.3; jax 0.12.1
unrolled: 42.5 against 139.7). `wrap` warns when asked for that.
"""

import warnings

import flax.linen as nn
import jax

from jaxml import runtime

CHOICES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


def merges_unrolled_recomputation() -> bool:
    """Whether XLA undoes jax.checkpoint outside loops here: jaxlib < 0.11 on the CPU backend
    (module docstring; `tests/test_remat.py` measures it on both sides)."""
    return runtime.jaxlib_version() < (0, 11) and jax.default_backend() == "cpu"


def check(remat: bool | str) -> str:
    """The policy name of a `remat` setting; anything unknown is a ValueError listing the choices."""
    if remat is True:
        return "full"
    if remat is False:
        return "none"
    if not isinstance(remat, str) or remat not in CHOICES:
        raise ValueError(f"unknown remat policy {remat!r}; expected one of {', '.join(CHOICES)} (or True / False)")
    return remat


def wrap(module_cls: type[nn.Module], remat: bool | str, *, scanned: bool = False,
         static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
    """`module_cls` itself for "none", else `nn.remat` of it under the named policy.

    `scanned`: the block runs inside `nn.scan`, whose loop boundary already keeps XLA from
    merging the recomputation back into the forward pass, so `prevent_cse` can be off there
    (faster); outside a scan it must stay on or the recomputation may be optimised away.
    `static_argnums` count `self` as 0 (a Python bool such as `train` must be static).
    """
    name = check(remat)
    if name == "none":
        return module_cls
    if not scanned and merges_unrolled_recomputation():
        warnings.warn(f"remat={name!r} on {module_cls.__name__} outside a scan saves no memory on jaxlib "
                      f"{'.'.join(map(str, runtime.jaxlib_version()))}'s CPU backend: XLA merges the recomputation "
                      "back into the forward pass (it only costs time). For the memory saving scan the layers "
                      "(a transformer stack's model.scan_layers=True) or use jaxlib >= 0.11.", stacklevel=2)
    if name == "full":
        policy = None  # jax.checkpoint's default: nothing saveable but the inputs
    elif name == "dots_saveable":
        policy = jax.checkpoint_policies.dots_saveable
    else:
        policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return nn.remat(module_cls, prevent_cse=not scanned, policy=policy, static_argnums=static_argnums)
