"""The train state: everything a checkpoint must hold to resume exactly."""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax


@flax.struct.dataclass
class TrainState:
  """Model variables, optimiser state and counters.

  Attributes:
    step: int32 [], updates attempted so far (applied or skipped).
    params: float32 model parameters.
    batch_stats: BatchNorm statistics ({} when the model has none).
    opt_state: optax state of `tx`.
    skipped: int32 [], updates skipped because the loss or a gradient was not finite.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  skipped: jax.Array

  @property
  def variables(self) -> dict:
    """{'params': ..., 'batch_stats': ...} as `module.apply` takes them."""
    return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(variables: Any, tx: optax.GradientTransformation) -> TrainState:
  """A state at step 0 from model variables ({'params', optional 'batch_stats'})."""
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                    skipped=jnp.zeros((), jnp.int32))


def train_state_initializer(model: Any, tx: optax.GradientTransformation,
                            image_hw: tuple[int, int], sharding: Any = None):
  """rng -> a fresh TrainState at step 0: `init_variables` and `tx.init` jit-compiled as one
  program, its outputs placed with `sharding` (None: the default device)."""
  return jax.jit(lambda rng: create_train_state(init_variables(model, rng, image_hw), tx),
                 out_shardings=sharding)


def place_train_state(variables: Any, tx: optax.GradientTransformation,
                      sharding: Any = None) -> TrainState:
  """`create_train_state` of given variables (a converted checkpoint) as one jit-compiled
  program, its outputs placed with `sharding` (None: the default device)."""
  return jax.jit(lambda v: create_train_state(v, tx), out_shardings=sharding)(variables)


def init_variables(model: Any, rng: jax.Array, image_hw: tuple[int, int]) -> dict:
  """Model variables from `model.init` on one zero image [1, H, W, 3]; always has 'batch_stats'."""
  images = jnp.zeros((1, *image_hw, 3), jnp.uint8)
  variables = dict(model.init({"params": rng}, images, train=False))
  variables.setdefault("batch_stats", {})
  return variables


def num_params(params: Any) -> int:
  """Number of scalar parameters."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
