"""Input checks for the public models: a wrong rank, size or dtype raises a ValueError naming the
model, what it expects and what came, e.g. "ResNet expects (batch, height, width, channels)
float images, got shape (3, 32, 32) int32".

They run while the model is traced (shapes and dtypes are static there), so a compiled step
pays nothing for them.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# kind -> (the word in the message, the accepted dtypes)
_KINDS = {
    "float": ("float", (jnp.floating,)),  # images, signals, latents, activations
    "int": ("integer", (jnp.integer,)),  # token ids, class labels, lengths
    "real": ("real-valued", (jnp.integer, jnp.floating)),  # features, noise levels
    "bool": ("boolean", (jnp.bool_,)),  # masks
}

_HINTS = {
    ("float", "int"): "; convert to floats first (integer images: x / 255)",
    ("int", "float"): "; token ids and labels must be integers (e.g. x.astype(jnp.int32))",
}


def describe(x: Any) -> str:
    """'shape (3, 32, 32) int32' for any array (or ShapeDtypeStruct)."""
    return f"shape {tuple(x.shape)} {jnp.dtype(x.dtype).name}"


def expect(model: nn.Module, x: Any, layouts: str | Sequence[str], kind: str, what: str,
           sizes: Mapping[str, int] | None = None) -> None:
    """Check that `x` has one of `layouts` ("(batch, length)"; alternatives of different ranks
    allowed) and a dtype of `kind` (float | int | real | bool). `sizes` pins named axes
    ({"batch": 4}): the message then shows "(batch=4, length)"."""
    layouts = (layouts,) if isinstance(layouts, str) else tuple(layouts)
    sizes = dict(sizes or {})
    axes = [layout.strip("()").replace(" ", "").rstrip(",").split(",") for layout in layouts]
    word, dtypes = _KINDS[kind]
    dtype = jnp.dtype(x.dtype)
    rank_ok = [names for names in axes if len(names) == x.ndim]
    size_ok = bool(rank_ok) and all(x.shape[i] == sizes[n] for i, n in enumerate(rank_ok[0]) if n in sizes)
    dtype_ok = any(jnp.issubdtype(dtype, d) for d in dtypes)
    if size_ok and dtype_ok:
        return
    shown = " or ".join("(" + ", ".join(f"{n}={sizes[n]}" if n in sizes else n for n in names)
                        + ("," if len(names) == 1 else "") + ")" for names in axes)
    got_kind = "float" if jnp.issubdtype(dtype, jnp.floating) else "int" if jnp.issubdtype(dtype, jnp.integer) else ""
    hint = "" if dtype_ok else _HINTS.get((kind, got_kind), "")
    raise ValueError(f"{type(model).__name__} expects {shown} {word} {what}, got {describe(x)}{hint}")
