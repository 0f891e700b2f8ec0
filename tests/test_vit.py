"""ViT: shapes for cls and mean pooling, parameter count of the tiny variant, patch-size errors."""

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from jaxml.models import vit


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_shapes_and_parameter_count(pool):
    model = vit.Tiny(num_classes=10, pool=pool)
    images = jnp.ones((2, 8, 8, 1))
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images))
    assert jax.eval_shape(lambda: model.apply(nn.unbox(model.init(jax.random.key(0), images)), images)).shape == (2, 10)
    tokens = 4 + (pool == "cls")
    # q, k, v, out kernels; biases on q, v, out (none on k); 2 LayerNorms; the MLP.
    block = 4 * 16 * 16 + 3 * 16 + 2 * 2 * 16 + (16 * 32 + 32) + (32 * 16 + 16)
    expected = (16 * 16 + 16) + tokens * 16 + (16 if pool == "cls" else 0) + block + 2 * 16 + (16 * 10 + 10)
    assert sum(a.size for a in jax.tree.leaves(shapes)) == expected


def test_vit_rejects_image_not_divisible_by_patch():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        vit.Tiny(num_classes=10).init(jax.random.key(0), jnp.ones((1, 10, 10, 1)))
