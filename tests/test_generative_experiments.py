"""End to end, tiny presets: each generative experiment trains, writes its pictures, and a run
resumed from its middle checkpoint ends with exactly the numbers of the uninterrupted run."""

import shutil

import jax
import numpy as np
import pytest

from experiments import autoencoder, diffusion, gan, latent_diffusion, vae
from jaxml.train import loop

PICTURES = {
    autoencoder: ("reconstructions.png", "anomaly.json"),
    vae: ("samples.png", "reconstructions.png", "interpolation.png"),
    gan: ("samples.png",),
    diffusion: ("samples_ddpm.png", "samples_ddim.png", "sample_quality.json"),
    latent_diffusion: ("samples.png", "sample_quality.json"),
}


def tiny(experiment):
    config = experiment.get_config("tiny")
    config.log.progress = False
    config.lock()
    return config


# The two U-Net experiments spend ~1 min (2-core CPU) compiling: init (partitionable threefry
# makes it ~3x slower to compile), train and eval steps, and their DDPM/DDIM sampling scans.
SLOW = (diffusion, latent_diffusion)


@pytest.mark.parametrize("experiment", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW else m for m in PICTURES],
                         ids=lambda m: m.__name__.split(".")[-1])
def test_runs_writes_pictures_and_resumes_identically(tmp_path, experiment):
    full = loop.train(experiment, tiny(experiment), str(tmp_path / "full"))  # checkpoints at 3 and 6
    for name in PICTURES[experiment]:
        assert (tmp_path / "full" / name).exists(), name
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")
    resumed = loop.train(experiment, tiny(experiment), str(tmp_path / "resumed"))
    assert full.step == resumed.step == 6
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(full.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    assert full.eval_metrics == resumed.eval_metrics
