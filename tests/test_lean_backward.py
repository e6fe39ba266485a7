"""m2f_jax's LayerNorm and softmax against PyTorch's (values and gradients), and the memory their
hand-written backward passes save over autodiff through flax's nn.LayerNorm and jax.nn.softmax."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

from m2f_jax.models.lean_backward import LayerNorm, softmax

C = 48


def _params(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {"params": {"scale": jnp.asarray(rng.normal(size=C), jnp.float32),
                     "bias": jnp.asarray(rng.normal(size=C), jnp.float32)}}


def test_init_gives_flax_layer_norm_params():
  x = jnp.zeros((2, 3, C))
  ours = jax.tree.map(np.asarray, LayerNorm().init(jax.random.key(0), x))
  flax_ = jax.tree.map(np.asarray, nn.LayerNorm().init(jax.random.key(0), x))
  assert jax.tree.structure(ours) == jax.tree.structure(flax_)
  jax.tree.map(np.testing.assert_array_equal, ours, flax_)


def test_layer_norm_values_and_gradients_match_torch():
  rng = np.random.default_rng(0)
  # A large common offset: a one-pass variance (E[x^2] - E[x]^2) would lose digits here.
  x = (rng.normal(size=(2, 5, 7, C)) * 3 + 40).astype(np.float32)
  grad_y = rng.normal(size=x.shape).astype(np.float32)
  variables = _params(1)
  module = LayerNorm(epsilon=1e-5)
  y, vjp = jax.vjp(lambda v, x: module.apply(v, x), variables, jnp.asarray(x))
  grad_vars, grad_x = vjp(jnp.asarray(grad_y))

  ref = torch.nn.LayerNorm(C, eps=1e-5)
  with torch.no_grad():
    ref.weight.copy_(torch.tensor(np.asarray(variables["params"]["scale"])))
    ref.bias.copy_(torch.tensor(np.asarray(variables["params"]["bias"])))
  x_t = torch.from_numpy(x).requires_grad_()
  y_t = ref(x_t)
  y_t.backward(torch.from_numpy(grad_y))
  np.testing.assert_allclose(y, y_t.detach().numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_x, x_t.grad.numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grad_vars["params"]["scale"], ref.weight.grad.numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(grad_vars["params"]["bias"], ref.bias.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_layer_norm_dtypes_follow_flax():
  x = jnp.ones((4, C), jnp.bfloat16)
  variables = _params(2)
  assert LayerNorm().apply(variables, x).dtype == jnp.float32  # promoted with the float32 params
  assert LayerNorm(dtype=jnp.bfloat16).apply(variables, x).dtype == jnp.bfloat16
  grad = jax.grad(lambda x: jnp.sum(LayerNorm(dtype=jnp.bfloat16).apply(variables, x)))(x)
  assert grad.dtype == jnp.bfloat16


def _stack_temp_bytes(layer_fn) -> int:
  """Compiled temp memory of the gradient of six (layer_fn -> tanh) layers on [4096, C]."""
  def loss(params, x):
    for _ in range(6):
      x = jnp.tanh(layer_fn(params, x))
    return jnp.sum(x)

  x = jnp.ones((4096, C))
  grad = jax.jit(jax.grad(loss)).lower(_params(3), x).compile()
  return grad.memory_analysis().temp_size_in_bytes


def test_layer_norm_backward_keeps_less_than_autodiff_through_flax():
  ours = _stack_temp_bytes(LayerNorm().apply)
  autodiff = _stack_temp_bytes(nn.LayerNorm(use_fast_variance=False).apply)
  layer = 4096 * C * 4
  assert ours <= autodiff - 3 * layer, (ours / layer, autodiff / layer)


def test_softmax_matches_torch_with_masked_entries():
  rng = np.random.default_rng(4)
  logits = (rng.normal(size=(3, 4, 9)) * 5).astype(np.float32)
  logits[..., 2] = -np.inf  # a masked key, as the decoder's masked attention writes it
  grad_w = rng.normal(size=logits.shape).astype(np.float32)
  weights, vjp = jax.vjp(softmax, jnp.asarray(logits))
  (grad_logits,) = vjp(jnp.asarray(grad_w))
  logits_t = torch.tensor(logits, requires_grad=True)
  weights_t = torch.softmax(logits_t, dim=-1)
  weights_t.backward(torch.tensor(grad_w))
  np.testing.assert_allclose(weights, weights_t.detach().numpy(), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(grad_logits, logits_t.grad.numpy(), rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(weights)[..., 2] == 0) and np.all(np.asarray(grad_logits)[..., 2] == 0)


def test_softmax_backward_keeps_less_than_autodiff_through_jax_nn():
  ours = _stack_temp_bytes(lambda p, x: softmax(x * p["params"]["scale"]))
  autodiff = _stack_temp_bytes(lambda p, x: jax.nn.softmax(x * p["params"]["scale"], axis=-1))
  layer = 4096 * C * 4
  assert ours <= autodiff - 3 * layer, (ours / layer, autodiff / layer)
