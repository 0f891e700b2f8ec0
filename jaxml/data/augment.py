"""Device-side image augmentation: pure jnp on whole batches, run inside the jitted train step.

Augmenting on the device keeps the host pipeline a plain gather of stored bytes, so the
host never bottlenecks small models. Every example draws its own crop offset and flip.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray, Shaped

Images = Shaped[Array, "B H W C"]


def random_crop(rng: PRNGKeyArray, images: Images, padding: int) -> Images:
    """Zero-pads every side by `padding` pixels, then crops each example back to HxW at a random offset."""
    _check_images(images)
    if padding < 0:
        raise ValueError(f"random_crop: padding must be >= 0, got {padding}")
    if padding == 0:
        return images
    B, H, W, C = images.shape
    padded_BxHpxWpxC = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    rng_y, rng_x = jax.random.split(rng)
    y_B = jax.random.randint(rng_y, (B,), 0, 2 * padding + 1)
    x_B = jax.random.randint(rng_x, (B,), 0, 2 * padding + 1)

    def crop(image_HpxWpxC, y, x):
        return jax.lax.dynamic_slice(image_HpxWpxC, (y, x, 0), (H, W, C))

    return jax.vmap(crop)(padded_BxHpxWpxC, y_B, x_B)


def random_flip(rng: PRNGKeyArray, images: Images) -> Images:
    """Mirrors each example left-right with probability 1/2."""
    _check_images(images)
    flip_B = jax.random.bernoulli(rng, 0.5, (images.shape[0],))
    return jnp.where(flip_B[:, None, None, None], images[:, :, ::-1, :], images)


def augment(rng: PRNGKeyArray, images: Images, *, crop_padding: int, flip: bool) -> Images:
    """Random crop (if crop_padding > 0) then random flip (if flip); the identity when both are off."""
    crop_rng, flip_rng = jax.random.split(rng)
    images = random_crop(crop_rng, images, crop_padding)
    if flip:
        images = random_flip(flip_rng, images)
    return images


def _check_images(images) -> None:
    if images.ndim != 4:
        raise ValueError(f"expected a batch of images B x H x W x C (4 dims), got shape {images.shape}")
