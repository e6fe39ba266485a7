"""m2f_jax's LayerNorm, GroupNorm and softmax against PyTorch's (values and gradients), the
memory their hand-written backward passes save over autodiff through flax and jax.nn, and
`gradients_together` (the same gradients as a plain call)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from m2f_jax.models.lean_backward import GroupNorm, LayerNorm, gradients_together, softmax

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


def test_softmax_to_bfloat16_matches_float32_within_rounding():
  logits = jnp.asarray(np.random.default_rng(10).normal(size=(3, 4, 9)) * 3, jnp.float32)
  grad_w = jnp.asarray(np.random.default_rng(11).normal(size=logits.shape), jnp.float32)
  weights, vjp = jax.vjp(lambda x: softmax(x, jnp.bfloat16), logits)
  weights_f32, vjp_f32 = jax.vjp(softmax, logits)
  (grad,) = vjp(grad_w.astype(jnp.bfloat16))
  (grad_f32,) = vjp_f32(grad_w)
  assert weights.dtype == jnp.bfloat16 and grad.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(weights, np.float32), weights_f32, rtol=1e-2, atol=1e-3)
  np.testing.assert_allclose(grad, grad_f32, rtol=2e-2, atol=2e-2)


def test_softmax_backward_keeps_less_than_autodiff_through_jax_nn():
  ours = _stack_temp_bytes(lambda p, x: softmax(x * p["params"]["scale"]))
  autodiff = _stack_temp_bytes(lambda p, x: jax.nn.softmax(x * p["params"]["scale"], axis=-1))
  layer = 4096 * C * 4
  assert ours <= autodiff - 3 * layer, (ours / layer, autodiff / layer)


def test_group_norm_params_values_and_gradients_match_torch():
  rng = np.random.default_rng(5)
  x = (rng.normal(size=(2, 5, 7, C)) * 3 + 40).astype(np.float32)  # large offset: two-pass variance
  grad_y = rng.normal(size=x.shape).astype(np.float32)
  module = GroupNorm(num_groups=4, epsilon=1e-5)
  ours = jax.tree.map(np.asarray, module.init(jax.random.key(0), jnp.asarray(x)))
  flax_ = jax.tree.map(np.asarray, nn.GroupNorm(num_groups=4).init(jax.random.key(0), jnp.asarray(x)))
  assert jax.tree.structure(ours) == jax.tree.structure(flax_)
  variables = _params(6)
  y, vjp = jax.vjp(lambda v, x: module.apply(v, x), variables, jnp.asarray(x))
  grad_vars, grad_x = vjp(jnp.asarray(grad_y))

  ref = torch.nn.GroupNorm(4, C, eps=1e-5)
  with torch.no_grad():
    ref.weight.copy_(torch.tensor(np.asarray(variables["params"]["scale"])))
    ref.bias.copy_(torch.tensor(np.asarray(variables["params"]["bias"])))
  x_t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
  y_t = ref(x_t)
  y_t.backward(torch.from_numpy(grad_y.transpose(0, 3, 1, 2).copy()))
  np.testing.assert_allclose(y, y_t.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_x, x_t.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grad_vars["params"]["scale"], ref.weight.grad.numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(grad_vars["params"]["bias"], ref.bias.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_group_norm_bfloat16_keeps_its_dtype_and_rejects_bad_widths():
  x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 6, C)), jnp.bfloat16)
  module = GroupNorm(num_groups=8, dtype=jnp.bfloat16)
  variables = _params(8)
  grad = jax.grad(lambda x: jnp.sum(module.apply(variables, x).astype(jnp.float32) ** 2))(x)
  grad_f32 = jax.grad(lambda x: jnp.sum(GroupNorm(8).apply(variables, x) ** 2))(x.astype(jnp.float32))
  assert module.apply(variables, x).dtype == jnp.bfloat16 and grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(grad, np.float32), grad_f32, rtol=0.05, atol=0.05)
  with pytest.raises(ValueError, match="48 channels do not split into 5 groups"):
    GroupNorm(num_groups=5).init(jax.random.key(0), x)


class _TwoDense(nn.Module):
  @nn.compact
  def __call__(self, x, scale):
    return nn.Dense(C)(nn.relu(nn.Dense(2 * C)(x))) * scale


def test_gradients_together_gives_the_plain_gradients():
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.normal(size=(3, C)), jnp.float32)
  scale = jnp.asarray(rng.normal(size=(C,)), jnp.float32)

  class Outer(nn.Module):
    together: bool

    @nn.compact
    def __call__(self, x, scale):
      layer = _TwoDense(name="layer")
      if self.together:
        return gradients_together(lambda module, *arrays: module(*arrays))(layer, x, scale)
      return layer(x, scale)

  variables = Outer(False).init(jax.random.key(1), x, scale)
  loss = lambda together: lambda v, x, s: jnp.sum(jnp.tanh(Outer(together).apply(v, x, s)))
  plain = jax.grad(loss(False), argnums=(0, 1, 2))(variables, x, scale)
  together = jax.grad(loss(True), argnums=(0, 1, 2))(variables, x, scale)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), plain, together)
  assert np.abs(np.asarray(plain[1])).max() > 0
