"""Rematerialisation by config: which of a block's activations the backward pass keeps, and which it recomputes.

    "none"                              keep everything (fastest, most memory)
    "full"                              keep only each block's inputs, recompute the rest
    "dots_saveable"                     keep matmul outputs, recompute the cheap elementwise ops
    "dots_with_no_batch_dims_saveable"  keep only weight matmuls (not attention's batched q.k / p.v)

The last two are `jax.checkpoint_policies` of those names. `True` / `False` mean "full" / "none".

On jaxlib < 0.11's CPU backend plain `jax.checkpoint` saves memory only in scanned stacks:
outside a loop XLA merges the recomputation back into the forward pass (common
subexpressions; neither the optimisation barriers `prevent_cse` adds nor an explicit
`lax.optimization_barrier` stop it there), so the backward pass kept every activation: the
unrolled 4-layer GPT of the benchmark's remat sweep kept 137.7 MB of temporaries with "full" as
with "none" (scanned: 44.9 against 150.3; jax 0.12.1 unrolled: 42.5 against 139.7). There
`wrap` ties the recomputation to the cotangent instead (`_tied`): a custom VJP whose backward
pass adds a zero computed from g[0] (one element of the block's output cotangent: `0.0 * g[0]`
where it is finite) to the saved inputs before it recomputes the block from them, a real data
dependency, so XLA can neither merge the recomputation into the forward pass nor run it before
the backward pass reaches the block.
The benchmark's GPT then keeps 42.7 MB with "full" (65.2 with "dots_with_no_batch_dims_saveable"),
the diffusion benchmark's U-Net 29.0 against 49.6 (plain: 49.2; jax 0.12.1: 28.7), for the
same gradients (`tests/test_remat.py`, with dropout). What it costs: plain forward mode
(`jax.jvp` of the model) through such a block raises JAX's "can't apply forward-mode autodiff
(jvp) to a custom_vjp function" (scanned stacks, remat="none" and jaxlib >= 0.11 keep plain
`jax.checkpoint`, which has it; forward over reverse, Hessian-vector products, works).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

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
    """`module_cls` itself for "none", else `module_cls` with its `__call__` checkpointed under the
    named policy: `nn.remat`, or where XLA would undo that (unrolled, `merges_unrolled_recomputation()`)
    the cotangent-tied form of the module docstring. Same parameters and names either way.

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
    if not scanned and merges_unrolled_recomputation():
        return _tied(module_cls, policy, static_argnums)
    return nn.remat(module_cls, prevent_cse=not scanned, policy=policy, static_argnums=static_argnums)


def _tied(module_cls: type[nn.Module], policy, static_argnums: tuple[int, ...]) -> type[nn.Module]:
    """`module_cls` whose `__call__` has a custom VJP: forward, `nn.vjp` of the checkpointed call
    (it keeps the inputs and what `policy` saves); backward, those residuals tied to the
    cotangent (`_tie`) and then the recomputation and the block's backward pass."""
    checkpointed = nn.checkpoint(module_cls.__call__, prevent_cse=True, policy=policy, static_argnums=static_argnums)

    def forward(module, *args):
        static = {i: arg for i, arg in enumerate(args, 1) if i in static_argnums}

        def call(module, *dynamic):  # nn.vjp differentiates every argument: the static ones come back in here
            rest = iter(dynamic)
            return checkpointed(module, *(static[i] if i in static else next(rest) for i in range(1, len(args) + 1)))

        return nn.vjp(call, module, *(arg for i, arg in enumerate(args, 1) if i not in static_argnums))

    def backward(*args):
        *_, vjp_fn, cotangent = args  # the static arguments come first: the residuals do not need them
        return _tie(vjp_fn, cotangent)(cotangent)

    call = nn.custom_vjp(module_cls.__call__, forward_fn=forward, backward_fn=backward, nondiff_argnums=static_argnums)
    # nn.remat's class name, so Flax's automatic module names are the same on every jaxlib.
    return type(f"Checkpoint{module_cls.__name__}", (module_cls,), {"__call__": call})


def _tie(residuals, cotangent):
    """`residuals` with a zero computed from c, one element of the cotangent, added to each
    floating-point leaf: the same values, computed only once the cotangent exists. The zero is
    `0.0 * c` where c is finite (XLA keeps x * 0.0: it is NaN for x = inf or NaN), else 0.0."""
    inexact = lambda leaf: hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)
    floats = [leaf for leaf in jax.tree.leaves(cotangent) if inexact(leaf) and leaf.size]
    if not floats:
        return residuals
    c = floats[0].reshape(-1)[0]
    zero = jnp.where(jnp.isfinite(c), 0.0 * c, 0.0)
    return jax.tree.map(lambda leaf: leaf + zero.astype(leaf.dtype) if inexact(leaf) else leaf, residuals)
