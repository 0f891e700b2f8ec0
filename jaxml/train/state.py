"""The train state: one immutable pytree that holds everything a step changes."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxml.train import optim

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
    def create(cls, params, tx: optax.GradientTransformation, ema_decay: float = 0.0, **slots) -> "TrainState":
        """A step-0 state whose optimizer state is `tx.init(params)`; with ema_decay > 0 it
        also keeps an EMA of the params, starting at the params."""
        ema = jax.tree.map(jnp.copy, params) if ema_decay > 0 else None
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema_params=ema, **slots)

    def apply_gradients(self, grads, tx: optax.GradientTransformation, ema_decay: float = 0.0,
                        **slots) -> "TrainState":
        """One optimizer update (and EMA update when the state keeps one); `slots` replaces
        other fields (e.g. new batch_stats)."""
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        ema = self.ema_params
        if ema is not None:
            if not 0.0 < ema_decay < 1.0:
                raise ValueError(f"the state keeps ema_params, so ema_decay must be in (0, 1), got {ema_decay}")
            ema = optim.ema_update(ema, params, ema_decay)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, ema_params=ema, **slots)
