"""Offline sample-quality measures: a Fréchet distance in a classifier's feature space, and the
accuracy of that classifier on class-conditional samples.

FID proper uses Inception-v3 features; its weights cannot be downloaded here (and Inception
knows nothing about 8x8 digits), so the feature network is jaxml's own CNN
(`jaxml.models.cnn`, as `experiments/cnn.py` builds it) trained on the same dataset —
quickly, by `train_classifier`. Numbers are comparable only for the same classifier.

Where pytorch-fid's weights file is at hand (`pt_inception-2015-12-05-6726825d.pth`, or a
.safetensors/.npz conversion of it), `inception_features(path)` (or the JAXML_INCEPTION_WEIGHTS
environment variable) gives FID's own feature space, `jaxml.models.inception` (checked against
pytorch-fid by tests/test_inception.py): `frechet_distance(f(a), f(b))` is then Inception-FID.
"""

import dataclasses
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxml import data, losses
from jaxml.models import cnn


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A trained CNN and its variables; images are floats in [0, 1], (B, H, W, C)."""

    model: nn.Module
    variables: Any

    def logits(self, images_BxHxWxC) -> np.ndarray:
        return np.asarray(_logits(self.model, self.variables, jnp.asarray(images_BxHxWxC, jnp.float32)))

    def features(self, images_BxHxWxC) -> np.ndarray:
        """The penultimate (dense, after relu) activations: the Fréchet distance's feature space."""
        return np.asarray(_features(self.model, self.variables, jnp.asarray(images_BxHxWxC, jnp.float32)))


@jax.jit
def _sgd_step(params, opt_state, images, labels):
    tx = _optimizer()

    def loss_fn(p):
        logits = _MODEL.apply({"params": p}, images, train=False)
        return losses.cross_entropy(logits, labels).mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _optimizer():
    return optax.adam(2e-3)


# The feature network: experiments/cnn.py's LeNet without dropout (quick, deterministic training).
_MODEL = cnn.CNN(num_classes=10, features=(32, 64), pool_after=(1,), dense=128, dropout=0.0)


def _logits(model, variables, images):
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)


def _features(model, variables, images):
    def fn(v, x):
        _, state = model.apply(v, x, train=False, capture_intermediates=lambda mdl, _: mdl.name == "Dense_0",
                               mutable=["intermediates"])
        return jax.nn.relu(state["intermediates"]["Dense_0"]["__call__"][0])
    return jax.jit(fn)(variables, images)


def train_classifier(images_NxHxWxC: np.ndarray, labels_N: np.ndarray, steps: int = 400, batch_size: int = 128,
                     seed: int = 0) -> Classifier:
    """The CNN trained with Adam on (images in [0, 1], labels): ~99% on the digits' test split in 400 steps."""
    images = jnp.asarray(images_NxHxWxC, jnp.float32)
    labels = jnp.asarray(labels_N, jnp.int32)
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(f"expected (N, H, W, C) images and (N,) labels, got {images.shape} and {labels.shape}")
    init_rng, data_rng = jax.random.split(jax.random.key(seed))
    params = _MODEL.init(init_rng, images[:1], train=False)["params"]
    opt_state = _optimizer().init(params)
    for step in range(steps):
        idx = jax.random.randint(jax.random.fold_in(data_rng, step), (batch_size,), 0, images.shape[0])
        params, opt_state = _sgd_step(params, opt_state, images[idx], labels[idx])
    return Classifier(_MODEL, {"params": params})


def frechet_distance(features_a_NxD: np.ndarray, features_b_MxD: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to two feature sets."""
    a, b = np.asarray(features_a_NxD, np.float64), np.asarray(features_b_MxD, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two (N, D) feature arrays of the same D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # A small ridge keeps the product's square root defined when there are fewer samples than features.
    ridge = 1e-6 * np.eye(cov_a.shape[0])
    # tr(sqrt(A B)) = tr(sqrt(sqrt(A) B sqrt(A))), and the latter is symmetric PSD: eigh is
    # exact and stable, with no complex round-off (and no scipy.linalg.sqrtm, whose API changed).
    sqrt_a = _sqrt_psd(cov_a + ridge)
    eigenvalues = np.linalg.eigvalsh(sqrt_a @ (cov_b + ridge) @ sqrt_a)
    trace_covmean = np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None)))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_covmean)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def inception_features(weights_path: str | None = None,
                       batch_size: int = 50) -> Callable[[np.ndarray], np.ndarray]:
    """images in [0, 1], (N, H, W, 1 or 3) -> (N, 2048) FID Inception pool3 features, from pytorch-fid's
    weights at `weights_path` or $JAXML_INCEPTION_WEIGHTS; grayscale is repeated to RGB."""
    from jaxml.models import inception

    path = weights_path or os.environ.get("JAXML_INCEPTION_WEIGHTS")
    if not path:
        raise ValueError("Inception-FID needs pytorch-fid's weights file (pt_inception-2015-12-05-6726825d.pth): "
                         "pass its path or set JAXML_INCEPTION_WEIGHTS; without it use classifier_frechet_distance")
    variables = inception.load_variables(path)
    apply = jax.jit(inception.FIDInceptionV3().apply)  # variables as an argument, not 24M baked-in constants

    def features(images_NxHxWxC) -> np.ndarray:
        images = np.asarray(images_NxHxWxC, np.float32)
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"expected (N, H, W, 1 or 3) images in [0, 1], got shape {images.shape}")
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        return np.concatenate([np.asarray(apply(variables, images[i:i + batch_size]))
                               for i in range(0, len(images), batch_size)] or [np.zeros((0, inception.FEATURES))])
    return features


def classifier_frechet_distance(classifier: Classifier, images_a, images_b) -> float:
    """Fréchet distance between two image sets in `classifier`'s feature space."""
    return frechet_distance(classifier.features(images_a), classifier.features(images_b))


def conditional_accuracy(classifier: Classifier, images_NxHxWxC, intended_labels_N) -> float:
    """Fraction of samples the classifier assigns to the class they were generated for."""
    predicted = classifier.logits(images_NxHxWxC).argmax(-1)
    return float(np.mean(predicted == np.asarray(intended_labels_N)))


def class_coverage(predicted_N, num_classes: int = 10) -> dict:
    """How an unconditional generator's samples spread over the classes a classifier predicts for
    them: the histogram, how many classes appear (at all, and in >= 2% of samples) and the
    histogram's entropy in bits (log2(num_classes) when uniform, 0 when collapsed to one class)."""
    predicted = np.asarray(predicted_N)
    if predicted.ndim != 1 or predicted.size == 0 or predicted.min() < 0 or predicted.max() >= num_classes:
        raise ValueError(f"expected a non-empty (N,) array of class indices in [0, {num_classes}), got shape "
                         f"{predicted.shape}" + (f", range [{predicted.min()}, {predicted.max()}]" if predicted.size else ""))
    counts = np.bincount(predicted, minlength=num_classes)
    p = counts[counts > 0] / counts.sum()
    return {
        "class_histogram": counts.tolist(),
        "classes_present": int(np.sum(counts > 0)),
        "classes_at_least_2pct": int(np.sum(counts >= 0.02 * counts.sum())),
        "class_entropy_bits": float(-np.sum(p * np.log2(p))),
        "class_entropy_bits_uniform": float(np.log2(num_classes)),
    }


def classifier_and_reference(data_config, to_unit: Callable[[np.ndarray], np.ndarray], steps: int,
                             seed: int) -> tuple[Classifier, np.ndarray, np.ndarray, np.ndarray]:
    """(classifier trained on the train split, test images, test labels, train images) of
    `data_config`'s dataset, images mapped by `to_unit` (uint8 -> floats in [0, 1] as the
    generator's samples are shaped)."""
    train = data.load_source(data_config.name, data_config.train_split, data_config.data_dir, cache=True)
    test = data.load_source(data_config.name, data_config.eval_split, data_config.data_dir, cache=True)
    train_images = np.asarray(to_unit(train.arrays["image"]))
    classifier = train_classifier(train_images, train.arrays["label"], steps=steps, seed=seed)
    return classifier, np.asarray(to_unit(test.arrays["image"])), np.asarray(test.arrays["label"]), train_images
