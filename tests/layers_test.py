"""Our conv layers against flax's nn.Conv / nn.ConvTranspose with the same parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from progression.errors import ProgressionError
from progression.models import conv_kernels, layers
from tests.conftest import random_normal as _x, skip_unless_available

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('impl', ['compiled', 'depth_taps', 'native', 'auto'])
@pytest.mark.parametrize('shape,features', [((2, 7, 6, 5, 3), 4), ((1, 4, 8, 6, 8), 8)])
def test_conv3d_matches_nn_conv_values_and_grads(impl, shape, features):
  if impl == 'compiled' and not conv_kernels.available():
    pytest.skip(conv_kernels.unavailable_reason())
  x = _x(shape)
  ref = nn.Conv(features, (3, 3, 3), padding='SAME')
  params = ref.init(jax.random.PRNGKey(1), x)
  params = jax.tree.map(lambda p: p + 0.1 * _x(p.shape, 3), params)  # non-zero bias
  ours = layers.Conv3D(features, impl=impl)
  ours_params = ours.init(jax.random.PRNGKey(2), x)
  assert jax.tree.map(jnp.shape, ours_params) == jax.tree.map(jnp.shape, params)

  f_ref = jax.jit(ref.apply)
  f_ours = jax.jit(ours.apply)
  np.testing.assert_allclose(f_ours(params, x), f_ref(params, x), **TOL)

  def loss(module):
    return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))

  g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(params, x)
  g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g_ours, g_ref)


@pytest.mark.parametrize('shape,cout', [((1, 6, 5, 4, 16), 3), ((2, 1, 4, 3, 2), 5),
                                        ((1, 5, 7, 6, 8), 16), ((1, 2, 3, 3, 1), 1)])
def test_depth_taps_matches_xla_conv_values_and_grads(shape, cout):
  """The output-side forward and the custom VJP (input gradient by output-side taps, kernel
  gradient by input-side taps) against `lax.conv_general_dilated`, float32 tolerance; includes
  the thin velocity head (16 -> 3) and a single x plane (no neighbours along x)."""
  x, kernel = _x(shape), _x((3, 3, 3, shape[-1], cout), 1)
  cotangent = _x((*shape[:-1], cout), 2)
  xla = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1, 1), 'SAME', dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))
  ours = lambda x, k: layers.conv3x3x3(x, k, 'depth_taps')
  np.testing.assert_allclose(jax.jit(ours)(x, kernel), xla(x, kernel), **TOL)
  vjp = lambda f: jax.jit(lambda x, k: jax.vjp(f, x, k)[1](cotangent))
  for got, want in zip(vjp(ours)(x, kernel), vjp(xla)(x, kernel)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_conv3d_dtype_and_errors():
  x = _x((1, 4, 4, 4, 2))
  m = layers.Conv3D(3, dtype=jnp.bfloat16)
  p = m.init(jax.random.PRNGKey(0), x)
  assert p['params']['kernel'].dtype == jnp.float32
  assert m.apply(p, x).dtype == jnp.bfloat16
  with pytest.raises(ProgressionError, match='impl'):
    layers.Conv3D(3, impl='fast').init(jax.random.PRNGKey(0), x)
  with pytest.raises(ProgressionError, match='batch, x, y, z'):
    layers.Conv3D(3).init(jax.random.PRNGKey(0), x[0])


# (shape, features): the compiled kernels compute 5 outputs padded to 8, 16 -> 32 as they
# are, and leave 72 outputs and the 72-channel input gradient to XLA.
RESAMPLE_CASES = [((2, 4, 6, 8, 3), 5), ((1, 2, 2, 2, 1), 5), ((1, 4, 2, 6, 16), 32),
                  ((1, 2, 4, 2, 8), 72), ((1, 2, 2, 4, 72), 16)]


@pytest.mark.parametrize('impl', ['compiled', 'native'])
@pytest.mark.parametrize('shape,features', RESAMPLE_CASES)
def test_downsample_matches_strided_nn_conv(shape, features, impl):
  skip_unless_available(impl)
  x = _x(shape)
  ref = nn.Conv(features, (2, 2, 2), strides=(2, 2, 2), padding='VALID')
  params = jax.tree.map(lambda p: p + 0.1, ref.init(jax.random.PRNGKey(1), x))
  ours = layers.Downsample(features, impl)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(2), x)) == jax.tree.map(
      jnp.shape, params)
  np.testing.assert_allclose(jax.jit(ours.apply)(params, x), ref.apply(params, x), **TOL)
  gl = lambda m: jax.grad(lambda p, x: jnp.sum(m.apply(p, x) ** 2), argnums=(0, 1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               jax.jit(gl(ours))(params, x), gl(ref)(params, x))


def test_downsample_odd_size_is_a_clear_error():
  with pytest.raises(ProgressionError, match='divisible by 2'):
    layers.Downsample(2).init(jax.random.PRNGKey(0), _x((1, 5, 4, 4, 1)))


@pytest.mark.parametrize('impl', ['compiled', 'native'])
@pytest.mark.parametrize('shape,features', [((2, 3, 4, 5, 3), 4), ((1, 1, 2, 1, 2), 4)]
                         + RESAMPLE_CASES[2:])
def test_upsample_matches_nn_conv_transpose(shape, features, impl):
  skip_unless_available(impl)
  x = _x(shape)
  ref = nn.ConvTranspose(features, (2, 2, 2), strides=(2, 2, 2))
  params = jax.tree.map(lambda p: p + 0.1, ref.init(jax.random.PRNGKey(1), x))
  ours = layers.Upsample2x(features, impl)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(2), x)) == jax.tree.map(
      jnp.shape, params)
  out = jax.jit(ours.apply)(params, x)
  assert out.shape == (shape[0], 2 * shape[1], 2 * shape[2], 2 * shape[3], features)
  np.testing.assert_allclose(out, ref.apply(params, x), **TOL)
  gl = lambda m: jax.grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x))), argnums=(0, 1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               jax.jit(gl(ours))(params, x), gl(ref)(params, x))


def test_space_to_depth_round_trip_and_block_order():
  x = _x((2, 4, 6, 2, 3))
  s = layers.space_to_depth(x, 2)
  assert s.shape == (2, 2, 3, 1, 24)
  # Channel (i, j, k, c) of block (a, b, d) is x[2a+i, 2b+j, 2d+k, c].
  np.testing.assert_array_equal(s[1, 1, 2, 0, ((1 * 2 + 0) * 2 + 1) * 3 + 2], x[1, 3, 4, 1, 2])
  np.testing.assert_array_equal(layers.depth_to_space(s, 2), x)
  assert layers.space_to_depth(x, 1) is x


def test_resolve_impl_auto_on_cpu():
  # Tests run on CPU: our compiled kernels where they build, else the depth-tap form.
  assert layers.resolve_impl('auto') == ('compiled' if conv_kernels.available() else 'depth_taps')
  assert layers.resolve_impl('native') == 'native'


def test_conv3d_fold_bias_returns_the_convolution_and_its_bias():
  x, conv = _x((1, 4, 4, 4, 3)), layers.Conv3D(8)
  params = jax.tree.map(lambda p: p + 0.1 * _x(p.shape, 3), conv.init(jax.random.PRNGKey(1), x))
  y, bias = conv.apply(params, x, fold_bias=True)
  np.testing.assert_allclose(bias, params['params']['bias'])
  np.testing.assert_allclose(y + bias, conv.apply(params, x), **TOL)


@pytest.mark.parametrize('impl', ['compiled', 'native'])
@pytest.mark.parametrize('shape,features', [((2, 3, 4, 5, 32), 16), ((1, 4, 3, 6, 8), 16),
                                            ((1, 2, 3, 4, 5), 3), ((1, 2, 2, 3, 8), 72)])
def test_pointwise_matches_nn_dense_values_and_grads(impl, shape, features):
  """Same parameters, values and gradients as nn.Dense on [B, X, Y, Z, C]: the compiled
  1x1x1 kernels (3 outputs padded to 8; 72 outputs and the 5-channel input gradient beyond
  or beside what they take, so a matmul there)."""
  if impl == 'compiled' and not conv_kernels.available():
    pytest.skip(conv_kernels.unavailable_reason())
  x, ref, ours = _x(shape), nn.Dense(features), layers.Pointwise(features, impl=impl)
  params = jax.tree.map(lambda p: p + 0.1 * _x(p.shape, 3), ref.init(jax.random.PRNGKey(1), x))
  assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(2), x)) == jax.tree.map(
      jnp.shape, params)
  np.testing.assert_allclose(jax.jit(ours.apply)(params, x), ref.apply(params, x), **TOL)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
  g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(params, x)
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g_ours, g_ref)
