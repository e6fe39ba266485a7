"""Sine position embedding shared by the pixel decoder and the transformer decoder."""
import jax.numpy as jnp


def sine_position_embedding(height: int, width: int, num_pos_feats: int,
                            temperature: float = 10000.0) -> jnp.ndarray:
  """The authors' normalised sine embedding of a [height, width] grid.

  Positions 1..H and 1..W are divided by their last value (+1e-6) and scaled to
  [0, 2*pi]; feature i of an axis divides by temperature ** (2 * floor(i / 2) / F)
  and takes sin on even i, cos on odd i. The y features come first, then x.

  Args:
    height: grid height H.
    width: grid width W.
    num_pos_feats: F, features per axis.
    temperature: base of the frequency progression.

  Returns:
    float32 [H, W, 2 * F].
  """
  if height < 1 or width < 1 or num_pos_feats < 1:
    raise ValueError(f"sine_position_embedding needs positive sizes, got height={height}, "
                     f"width={width}, num_pos_feats={num_pos_feats}")
  scale = 2.0 * jnp.pi
  eps = 1e-6
  y = jnp.arange(1, height + 1, dtype=jnp.float32)
  x = jnp.arange(1, width + 1, dtype=jnp.float32)
  y = y / (y[-1] + eps) * scale
  x = x / (x[-1] + eps) * scale
  exponent = 2.0 * (jnp.arange(num_pos_feats) // 2).astype(jnp.float32) / num_pos_feats
  dim_t = jnp.asarray(temperature, jnp.float32) ** exponent  # [F]
  is_even = (jnp.arange(num_pos_feats) % 2) == 0

  def encode(positions):  # [N] -> [N, F]
    angles = positions[:, None] / dim_t
    return jnp.where(is_even, jnp.sin(angles), jnp.cos(angles))

  pos_y = jnp.broadcast_to(encode(y)[:, None, :], (height, width, num_pos_feats))
  pos_x = jnp.broadcast_to(encode(x)[None, :, :], (height, width, num_pos_feats))
  return jnp.concatenate([pos_y, pos_x], axis=-1)
