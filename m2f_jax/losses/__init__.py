"""Hungarian matching and the point-sampled Mask2Former loss."""
from m2f_jax.losses.criterion import mask2former_loss
from m2f_jax.losses.criterion import match_predictions
from m2f_jax.losses.matcher import assign
from m2f_jax.losses.matcher import matching_cost
