"""Rematerialisation by config: which of a block's activations the backward pass keeps, and which it recomputes.

    "none"                              keep everything (fastest, most memory)
    "full"                              keep only each block's inputs, recompute the rest
    "dots_saveable"                     keep matmul outputs, recompute the cheap elementwise ops
    "dots_with_no_batch_dims_saveable"  keep only weight matmuls (not attention's batched q.k / p.v)

The last two are `jax.checkpoint_policies` of those names. `True` / `False` mean "full" / "none".
"""

import flax.linen as nn
import jax

CHOICES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


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
    if name == "full":
        policy = None  # jax.checkpoint's default: nothing saveable but the inputs
    elif name == "dots_saveable":
        policy = jax.checkpoint_policies.dots_saveable
    else:
        policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return nn.remat(module_cls, prevent_cse=not scanned, policy=policy, static_argnums=static_argnums)
