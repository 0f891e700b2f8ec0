"""InceptionV3 in the FID variant (pytorch-fid's `FIDInceptionA/C/E_1/E_2`), NHWC, inference only,
and a converter from pytorch-fid's state dict (`pt_inception-2015-12-05-6726825d.pth`, the
TensorFlow FID weights ported to PyTorch) to this module's params/batch_stats.

FID's variant differs from torchvision's Inception3: the branch average pools in Mixed_5b..7b
exclude the padding from the mean (TensorFlow's behaviour) and Mixed_7c pools by max. Module
names follow the PyTorch ones, so a state-dict key `Mixed_6b.branch7x7_2.conv.weight` is
`params["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]`.
"""

import functools
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxml.models import _checks

FEATURES = 2048  # pool3: the global average of Mixed_7c, FID's feature space
INPUT_SIZE = 299


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
    """conv (no bias) - BatchNorm (eps 1e-3, running statistics) - relu, as torchvision's BasicConv2d."""

    features: int
    kernel_size: Any
    stride: int = 1
    padding: Any = 0

    @nn.compact
    def __call__(self, x):
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel_size), strides=_pair(self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x):
    # TensorFlow's average pool, which FID's network was trained with, leaves the padding out of the mean.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride=1, padding=1):
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((padding, padding), (padding, padding)))


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, 1, name="branch1x1")(x)
        b5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, 3, stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x, stride=2, padding=0)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, 1, name="branch1x1")(x)
        b7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, 3, stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, stride=2, padding=0)], axis=-1)


class InceptionE(nn.Module):
    pool: str  # "avg" (FIDInceptionE_1, Mixed_7b) or "max" (FIDInceptionE_2, Mixed_7c)

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, 1, name="branch1x1")(x)
        b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        # FID's last block max-pools here (an accident of the TensorFlow graph it reproduces).
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else _max_pool_3x3(x)
        bp = BasicConv2d(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """Images in [0, 1], (B, H, W, 3), resized bilinearly to 299x299 -> (B, 2048) pool3 features."""

    resize_input: bool = True

    @nn.compact
    def __call__(self, x: Float[Array, "B H W 3"]) -> Float[Array, "B 2048"]:
        _checks.expect(self, x, "(batch, height, width, channels)", "float", "RGB images in [0, 1]", {"channels": 3})
        x = x.astype(jnp.float32)
        if self.resize_input:
            # torch's F.interpolate(bilinear, align_corners=False) does not antialias when shrinking.
            x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "bilinear", antialias=False)
        x = 2.0 * x - 1.0
        x = BasicConv2d(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x, stride=2, padding=0)
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3(x, stride=2, padding=0)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        return x.mean(axis=(1, 2))


# state-dict leaf -> (collection, flax leaf name); num_batches_tracked and the 1008-way fc are unused.
_LEAVES = {"conv.weight": ("params", "kernel"), "bn.weight": ("params", "scale"), "bn.bias": ("params", "bias"),
           "bn.running_mean": ("batch_stats", "mean"), "bn.running_var": ("batch_stats", "var")}


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict:
    """pytorch-fid's FID Inception state dict (tensors or arrays) -> {"params", "batch_stats"} of FIDInceptionV3."""
    variables: dict = {"params": {}, "batch_stats": {}}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked") or key.startswith(("fc.", "AuxLogits.")):
            continue
        path, _, leaf = key.rpartition(".")
        path, _, module = path.rpartition(".")
        if f"{module}.{leaf}" not in _LEAVES or not path:
            raise ValueError(f"unexpected key {key!r} in the Inception state dict: expected "
                             f"'<block>[.<branch>].conv.weight' or '.bn.<weight|bias|running_mean|running_var>'")
        collection, name = _LEAVES[f"{module}.{leaf}"]
        array = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, np.float32)
        if name == "kernel":
            array = array.transpose(2, 3, 1, 0)  # torch (O, I, kh, kw) -> flax (kh, kw, I, O)
        node = variables[collection]
        for part in path.split(".") + [module]:
            node = node.setdefault(part, {})
        node[name] = jnp.asarray(array)
    _check_shapes(variables)
    return variables


@functools.cache
def _expected_shapes() -> dict:
    expected = jax.eval_shape(lambda: FIDInceptionV3().init(jax.random.key(0), jnp.zeros((1, 75, 75, 3))))
    return {jax.tree_util.keystr(p): l.shape for p, l in jax.tree_util.tree_leaves_with_path(dict(expected))}


def _check_shapes(variables) -> None:
    want = _expected_shapes()
    got = {jax.tree_util.keystr(p): l.shape for p, l in jax.tree_util.tree_leaves_with_path(variables)}
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    wrong = [f"{k}: expected {want[k]}, got {got[k]}" for k in sorted(want.keys() & got.keys()) if want[k] != got[k]]
    if missing or extra or wrong:
        raise ValueError(f"the state dict is not pytorch-fid's FID Inception: {len(missing)} missing "
                         f"(e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]}), wrong shapes {wrong[:3]}")


def load_state_dict(path: str) -> Mapping[str, Any]:
    """pytorch-fid's weights file: the official .pth (needs torch), or a .safetensors / .npz conversion of it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no Inception weights file at {path!r} (expected pytorch-fid's "
                                f"pt_inception-2015-12-05-6726825d.pth or a .safetensors/.npz conversion)")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        return load_file(path)
    if path.endswith(".npz"):
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    if path.endswith((".pth", ".pt")):
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"reading {path!r} needs torch; or convert it to .safetensors/.npz where torch is") from e
        return torch.load(path, map_location="cpu", weights_only=True)
    raise ValueError(f"expected a .pth, .pt, .safetensors or .npz Inception weights file, got {path!r}")


def load_variables(path: str) -> dict:
    """FIDInceptionV3's variables from pytorch-fid's weights file (see `load_state_dict`)."""
    return convert_state_dict(load_state_dict(path))
