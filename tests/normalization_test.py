"""normalization.GroupNorm and scale_shift_silu against flax's GroupNorm and jax.nn.silu."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from progression.errors import ProgressionError
from progression.models import normalization
from tests.conftest import random_normal as _x, skip_unless_available

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape,groups', [((2, 5, 4, 6, 16), 8), ((1, 3, 7, 2, 8), 8),
                                          ((1, 4, 4, 4, 6), 3), ((1, 2, 2, 2, 5), 1)])
def test_group_norm_matches_flax_values_and_grads(shape, groups):
  """Same parameters, values and gradients as nn.GroupNorm; offset data (mean 3) checks the
  E[x^2] - E[x]^2 variance where it is most fragile."""
  x = 3.0 + _x(shape)
  ref, ours = nn.GroupNorm(groups), normalization.GroupNorm(groups)
  params = ref.init(jax.random.PRNGKey(1), x)
  params = jax.tree.map(lambda p: p + 0.1 * _x(p.shape, 3), params)  # not the identity
  assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(2), x)) == jax.tree.map(
      jnp.shape, params)
  np.testing.assert_allclose(jax.jit(ours.apply)(params, x), ref.apply(params, x),
                             rtol=1e-4, atol=1e-4)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)) * jnp.arange(shape[-1]))
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(params, x)
  g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3), g_ours, g_ref)


def test_group_norm_channels_must_split_into_groups():
  with pytest.raises(ProgressionError, match='6 channels'):
    normalization.GroupNorm(4).init(jax.random.PRNGKey(0), _x((1, 2, 2, 2, 6)))


@pytest.mark.parametrize('shape,groups', [((2, 5, 4, 6, 16), 8), ((1, 4, 4, 4, 6), 3)])
def test_group_norm_with_offset_film_and_silu_matches_the_unfused_layers(shape, groups):
  """GroupNorm(x, film, silu=True, offset=b) = silu(nn.GroupNorm(x + b) * (1 + gamma) + beta):
  values and gradients (x, b, gamma, beta and the norm's parameters), the offset folded into
  the statistics and the FiLM and SiLU into one multiply-add."""
  b, c = shape[0], shape[-1]
  x, offset = 2.0 + _x(shape), 0.5 * _x((c,), 4)
  film = (0.3 * _x((b, c), 5), 0.3 * _x((b, c), 6))
  ref, ours = nn.GroupNorm(groups), normalization.GroupNorm(groups)
  params = jax.tree.map(lambda p: p + 0.1 * _x(p.shape, 3), ref.init(jax.random.PRNGKey(1), x))

  def unfused(p, x, offset, film):
    gamma, beta = (f[:, None, None, None] for f in film)
    h = ref.apply(p, x + offset) * (1.0 + gamma) + beta
    return jax.nn.silu(h)

  fused = lambda p, x, offset, film: ours.apply(p, x, film=film, silu=True, offset=offset)
  args = (params, x, offset, film)
  np.testing.assert_allclose(jax.jit(fused)(*args), unfused(*args), rtol=1e-4, atol=1e-4)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)) * jnp.arange(c))
  g_ours = jax.jit(jax.grad(loss(fused), argnums=(0, 1, 2, 3)))(*args)
  g_ref = jax.grad(loss(unfused), argnums=(0, 1, 2, 3))(*args)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3), g_ours, g_ref)


@pytest.mark.parametrize('impl', ['compiled', 'native'])
@pytest.mark.parametrize('channels', [8, 16, 64, 12])  # 12: not the compiled kernel's
def test_scale_shift_silu_values_and_grads(impl, channels):
  skip_unless_available(impl)
  x = 4.0 * _x((2, 3, 4, 5, channels))
  scale, shift = 1.0 + _x((2, channels), 1), _x((2, channels), 2)
  plain = lambda x, a, c: jax.nn.silu(x * a[:, None, None, None] + c[:, None, None, None])
  ours = lambda x, a, c: normalization.scale_shift_silu(x, a, c, impl)
  np.testing.assert_allclose(jax.jit(ours)(x, scale, shift), plain(x, scale, shift), **TOL)
  loss = lambda f: lambda *a: jnp.sum(jnp.cos(f(*a)))
  got = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(x, scale, shift)
  want = jax.grad(loss(plain), argnums=(0, 1, 2))(x, scale, shift)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, want)
