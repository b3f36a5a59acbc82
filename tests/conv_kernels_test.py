"""The compiled convolution kernels (conv_kernels.cc via XLA FFI) against XLA's convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from progression.errors import ProgressionError
from progression.models import conv_kernels, layers
from tests.conftest import random_normal as _x

needs_kernels = pytest.mark.skipif(not conv_kernels.available(),
                                   reason=str(conv_kernels.unavailable_reason()))


def _xla(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), 'SAME',
                                      dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))


def _assert_close(got, want):
  """float32 tolerance relative to the largest value (sums of up to 27 * 64 products)."""
  scale = float(jnp.max(jnp.abs(want)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * scale)


# Rows of 1, 2, 13 (every z block size of the 8-channel forward: 1 + 8 + 2 + 1 + 1) and 30
# (16 + 8 + 4 + 1 + 1) voxels; single x and y planes; channel counts of our U-Nets and
# the odd ones (1, 3, 5 input channels: the input-channel block remainders).
SHAPES = [((1, 4, 5, 13, 3), 8), ((2, 3, 4, 30, 8), 16), ((1, 1, 3, 2, 5), 24),
          ((2, 2, 1, 1, 16), 8), ((1, 3, 3, 7, 32), 64), ((1, 5, 4, 9, 1), 40)]


@needs_kernels
@pytest.mark.parametrize('size', conv_kernels.SIZES)
@pytest.mark.parametrize('shape,cout', SHAPES)
def test_forward_and_kernel_grad_match_xla(shape, cout, size):
  """3x3x3 and pointwise (1x1x1) kernels against XLA's convolution."""
  x, kernel = _x(shape), 0.3 * _x((size,) * 3 + (shape[-1], cout), 1)
  dy = _x((*shape[:-1], cout), 2)
  _assert_close(jax.jit(conv_kernels.forward)(x, kernel), _xla(x, kernel))
  (want,) = jax.vjp(lambda k: _xla(x, k), kernel)[1](dy)
  _assert_close(jax.jit(conv_kernels.kernel_grad, static_argnums=2)(x, dy, size), want)


@needs_kernels
@pytest.mark.parametrize('shape,cout', [((2, 5, 6, 11, 8), 16), ((1, 6, 5, 4, 16), 3),
                                        ((1, 4, 4, 18, 3), 8), ((1, 3, 4, 5, 4), 12),
                                        ((1, 2, 3, 4, 72), 8)])
def test_compiled_conv_values_and_grads_match_xla(shape, cout):
  """conv3x3x3(impl='compiled') and its VJP against XLA. The forward and the kernel gradient
  run the kernels with Cout padded to a multiple of 8 (16 -> 3: the velocity head; 4 -> 12),
  the input gradient with Cin padded (3 -> 8: the input layer); 72 channels are more than
  the kernels take, so that input gradient is the depth-tap form."""
  x, kernel = _x(shape), 0.3 * _x((3, 3, 3, shape[-1], cout), 1)
  dy = _x((*shape[:-1], cout), 2)
  ours = lambda x, k: layers.conv3x3x3(x, k, 'compiled')
  _assert_close(jax.jit(ours)(x, kernel), _xla(x, kernel))
  vjp = lambda f: jax.jit(lambda x, k: jax.vjp(f, x, k)[1](dy))
  for got, want in zip(vjp(ours)(x, kernel), vjp(_xla)(x, kernel)):
    _assert_close(got, want)


@needs_kernels
@pytest.mark.parametrize('coarse,cin,cout', [((2, 3, 4, 5), 5, 8), ((1, 2, 2, 13), 16, 32),
                                             ((1, 4, 3, 2), 64, 64), ((2, 1, 1, 1), 3, 16)])
def test_resample_and_its_kernel_grad_match_xla(coarse, cin, cout):
  """Down = stride-2 kernel-2 convolution; up = its transpose (XLA's input gradient of it):
  values and kernel gradients, z rows that hit every block remainder."""
  fine = (coarse[0],) + tuple(2 * n for n in coarse[1:]) + (cin,)
  kernel = 0.3 * _x((2, 2, 2, cin, cout), 1)
  strided = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (2, 2, 2), 'VALID', dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))
  x_fine, dy_coarse = _x(fine), _x(coarse + (cout,), 2)
  _assert_close(conv_kernels.resample(x_fine, kernel, up=False), strided(x_fine, kernel))
  (want,) = jax.vjp(lambda k: strided(x_fine, k), kernel)[1](dy_coarse)
  _assert_close(conv_kernels.resample_kernel_grad(x_fine, dy_coarse, up=False), want)
  # Up with kernel w is the input gradient of down with w's channel axes swapped.
  x_coarse, dy_fine = _x(coarse + (cin,), 3), _x(fine[:-1] + (cout,), 4)
  up_xla = lambda x, k: jax.vjp(lambda f: strided(f, k.swapaxes(3, 4)),
                                jnp.zeros(fine[:-1] + (cout,)))[1](x)[0]
  _assert_close(conv_kernels.resample(x_coarse, kernel, up=True), up_xla(x_coarse, kernel))
  (want,) = jax.vjp(lambda k: up_xla(x_coarse, k), kernel)[1](dy_fine)
  _assert_close(conv_kernels.resample_kernel_grad(x_coarse, dy_fine, up=True), want)


@needs_kernels
def test_scale_shift_silu_against_float64_and_at_the_extremes():
  """silu(x * scale + shift) within float32 rounding of a float64 reference (our exp is a
  polynomial), saturating like XLA's at +-1000 and exact at 0; its gradients as XLA's."""
  x, scale, shift = 6.0 * _x((2, 5, 4, 7, 24)), 1.0 + _x((2, 24), 1), _x((2, 24), 2)
  h = (np.asarray(x, np.float64) * np.asarray(scale)[:, None, None, None]
       + np.asarray(shift)[:, None, None, None])
  np.testing.assert_allclose(conv_kernels.scale_shift_silu(x, scale, shift), h / (1 + np.exp(-h)),
                             rtol=1e-6, atol=1e-6)
  plain = lambda x, a, c: jax.nn.silu(x * a[:, None, None, None] + c[:, None, None, None])
  dout = _x(x.shape, 3)
  grads = jax.jit(conv_kernels.scale_shift_silu_grad)(x, scale, shift, dout)
  for got, want in zip(grads, jax.vjp(plain, x, scale, shift)[1](dout)):
    _assert_close(got, want)
  for _ in range(3):  # chunked sums in a fixed order
    for got, first in zip(jax.jit(conv_kernels.scale_shift_silu_grad)(x, scale, shift, dout),
                          grads):
      np.testing.assert_array_equal(got, first)
  edge = jnp.array([-1000.0, -88.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 1000.0]).reshape(1, 1, 1, 1, 8)
  ones, zeros = jnp.ones((1, 8)), jnp.zeros((1, 8))
  np.testing.assert_allclose(conv_kernels.scale_shift_silu(edge, ones, zeros), jax.nn.silu(edge),
                             rtol=1e-6, atol=1e-30)


@needs_kernels
def test_kernel_grad_is_bitwise_reproducible():
  """The kernel gradient sums fixed chunks of planes in a fixed order (training resumes
  bit-exactly), whichever pool thread runs which chunk."""
  x, dy = _x((2, 24, 6, 10, 8)), _x((2, 24, 6, 10, 16), 1)
  grad = jax.jit(conv_kernels.kernel_grad)
  first = np.asarray(grad(x, dy))
  for _ in range(5):
    np.testing.assert_array_equal(np.asarray(grad(x, dy)), first)


@needs_kernels
def test_compiled_conv_under_pmap_and_vmap():
  """Two forced CPU devices each run the kernels (pmap), and vmap falls back to a loop."""
  n = jax.local_device_count()
  x, kernel = _x((n, 1, 4, 5, 6, 8)), 0.3 * _x((3, 3, 3, 8, 16), 1)
  loss = lambda k, x: jnp.sum(jnp.sin(layers.conv3x3x3(x, k, 'compiled')))
  ref_loss = lambda k, x: jnp.sum(jnp.sin(_xla(x, k)))
  got = jax.pmap(jax.grad(loss), in_axes=(None, 0))(kernel, x)
  want = jax.vmap(jax.grad(ref_loss), in_axes=(None, 0))(kernel, x)
  _assert_close(got, want)
  _assert_close(jax.vmap(jax.grad(loss), in_axes=(None, 0))(kernel, x), want)


def test_supports_names_the_shapes_the_kernels_compute():
  assert conv_kernels.supports(8, jnp.float32) and conv_kernels.supports(64, jnp.float32)
  assert not conv_kernels.supports(3, jnp.float32)  # the velocity head
  assert not conv_kernels.supports(12, jnp.float32)
  assert not conv_kernels.supports(72, jnp.float32)
  assert not conv_kernels.supports(16, jnp.bfloat16)
  assert conv_kernels.padded_channels(3, jnp.float32) == 8
  assert conv_kernels.padded_channels(12, jnp.float32) == 16
  assert conv_kernels.padded_channels(64, jnp.float32) == 64
  assert conv_kernels.padded_channels(65, jnp.float32) is None
  assert conv_kernels.padded_channels(8, jnp.bfloat16) is None


@needs_kernels
def test_unsupported_shapes_are_an_error_from_the_kernel():
  with pytest.raises(Exception, match='multiple of 8'):
    jax.block_until_ready(conv_kernels.forward(_x((1, 3, 3, 3, 2)), _x((3, 3, 3, 2, 12))))
  with pytest.raises(Exception, match='K 1 or 3'):
    jax.block_until_ready(conv_kernels.forward(_x((1, 3, 3, 3, 2)), _x((2, 2, 2, 2, 8))))


def test_build_without_a_compiler_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
  target = tmp_path / 'lib.so'
  with pytest.raises(ProgressionError, match='no-such-compiler'):
    conv_kernels.build(target)
  assert not target.exists() and list(tmp_path.iterdir()) == []  # no half-written library


def test_auto_falls_back_to_depth_taps_when_the_kernels_cannot_be_built(tmp_path, monkeypatch):
  monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
  monkeypatch.setenv('PROGRESSION_CACHE_DIR', str(tmp_path / 'cache'))
  conv_kernels._load.cache_clear()
  try:
    assert not conv_kernels.available()
    assert 'no-such-compiler' in conv_kernels.unavailable_reason()
    assert layers.resolve_impl('auto') == 'depth_taps'
    with pytest.raises(ProgressionError, match='no-such-compiler'):
      layers.resolve_impl('compiled')
  finally:
    conv_kernels._load.cache_clear()


def test_library_is_cached_per_source_and_cpu(tmp_path, monkeypatch):
  monkeypatch.setenv('PROGRESSION_CACHE_DIR', str(tmp_path))
  path = conv_kernels.library_path()
  assert path.parent == tmp_path and path.name.startswith('conv_kernels-')
  monkeypatch.setenv('CXX', 'clang++')
  assert conv_kernels.library_path() != path  # another compiler, another library


@needs_kernels
def test_build_writes_a_loadable_library(tmp_path, monkeypatch):
  import ctypes
  # Unoptimised: the same build steps in a third of the time (the cached library, built
  # with conv_kernels.FLAGS, runs every other test).
  monkeypatch.setattr(conv_kernels, 'FLAGS', ('-O0',) + conv_kernels.FLAGS[1:])
  target = tmp_path / 'conv.so'
  conv_kernels.build(target)
  library = ctypes.cdll.LoadLibrary(str(target))
  assert all(getattr(library, symbol) for symbol in conv_kernels._SYMBOLS.values())
  assert [p.name for p in tmp_path.iterdir()] == ['conv.so']


def test_disabled_by_environment(monkeypatch):
  monkeypatch.setenv('PROGRESSION_COMPILED_CONV', '0')
  conv_kernels._load.cache_clear()
  try:
    assert not conv_kernels.available()
    assert layers.resolve_impl('auto') == 'depth_taps'
  finally:
    conv_kernels._load.cache_clear()
