"""Knowledge distillation: the loss, and experiments.distill end to end (teacher held fixed)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import distill
from jaxml import losses, transfer


def test_distillation_loss_matches_its_definition():
    student = jax.random.normal(jax.random.key(0), (4, 5))
    teacher = jax.random.normal(jax.random.key(1), (4, 5)) * 3
    labels = jnp.array([0, 1, 2, 3])
    t, alpha = 3.0, 0.7
    p_t = jax.nn.softmax(teacher / t)
    kl = jnp.sum(p_t * (jnp.log(p_t) - jax.nn.log_softmax(student / t)), -1)
    ce = optax.softmax_cross_entropy_with_integer_labels(student, labels)
    np.testing.assert_allclose(losses.distillation(student, teacher, labels, t, alpha),
                               (1 - alpha) * ce + alpha * t**2 * kl, rtol=1e-5)
    np.testing.assert_allclose(losses.distillation(student, teacher, labels, t, 0.0), ce, rtol=1e-6)
    # Matching the teacher leaves only the hard term; the teacher gets no gradient.
    np.testing.assert_allclose(losses.distillation(teacher, teacher, labels, t, 1.0), 0.0, atol=1e-5)
    grad_teacher = jax.grad(lambda z: losses.distillation(student, z, labels, t, alpha).sum())(teacher)
    np.testing.assert_array_equal(grad_teacher, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        losses.distillation(student, teacher[:, :3], labels)


@pytest.mark.slow  # ~30 s of CPU: three tiny training runs (teacher, scratch student, distilled student)
def test_distill_tiny_runs_end_to_end_with_a_fixed_teacher(tmp_path):
    config = distill.get_config("tiny")
    config.log.progress = False
    summary = distill.run(config, str(tmp_path))
    assert set(summary) >= {"teacher", "student_scratch", "student_distilled"}
    assert summary["student_distilled"]["params"] == summary["student_scratch"]["params"]
    assert summary["teacher"]["params"] > 2 * summary["student_scratch"]["params"]
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(summary))
    assert "student_distilled" in (tmp_path / "results.md").read_text()
    # The teacher in the distilled run's state is the teacher's checkpoint, unchanged by training.
    from jaxml.train import checkpoint

    teacher = transfer.read_checkpoint(str(tmp_path / "teacher"))
    stored = checkpoint.ocp.StandardCheckpointer().restore(
        str(tmp_path / "distilled" / "checkpoints" / str(config.train.steps) / "state"))
    flat = transfer.flatten(stored["extra"]["teacher"]["params"])
    assert flat.keys() == {k for k in teacher if k.startswith("params/")}
    for k, v in flat.items():
        np.testing.assert_array_equal(v, teacher[k], err_msg=k)
