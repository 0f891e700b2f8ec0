"""The train state: one immutable pytree that holds everything a step changes."""

from typing import Any

import flax.struct
import jax.numpy as jnp
import optax

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """step, params and opt_state, plus the optional slots some families need.

    `batch_stats` holds BatchNorm running statistics, `ema_params` an exponential moving
    average of the params (sampling in diffusion), `extra` anything else a family keeps
    between steps (a GAN's second optimizer state, for example). Slots a family does not
    use stay `None`, which is an empty pytree: they cost nothing and are never saved.
    """

    step: jnp.ndarray
    params: PyTree
    opt_state: optax.OptState
    batch_stats: PyTree = None
    ema_params: PyTree = None
    extra: PyTree = None

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, **slots) -> "TrainState":
        """A step-0 state whose optimizer state is `tx.init(params)`."""
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), **slots)

    def apply_gradients(self, grads, tx: optax.GradientTransformation, **slots) -> "TrainState":
        """One optimizer update; `slots` replaces other fields (e.g. new batch_stats)."""
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **slots)
