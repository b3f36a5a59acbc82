"""Known-answer tests for warping, scaling and squaring, composition and Jacobians."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from progression.errors import ProgressionError
from progression.models import warp as W

RNG = np.random.default_rng(0)
S = 16


def _smooth_velocity(batch=2, shape=(S, S, S), sigma=3.0, max_abs=1.5, seed=0):
  """Gaussian-smoothed noise, rescaled so max |v| = max_abs voxels/year."""
  rng = np.random.default_rng(seed)
  v = rng.normal(size=(batch, *shape, 3))
  v = np.stack([np.stack([ndimage.gaussian_filter(v[b, ..., a], sigma, mode='nearest')
                          for a in range(3)], -1) for b in range(batch)])
  return (v * max_abs / np.abs(v).max()).astype(np.float32)


def _numpy_warp(image, disp):
  """scipy truth: per batch/channel map_coordinates, order 1, coordinates clamped."""
  b, nx, ny, nz, c = image.shape
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in (nx, ny, nz)], indexing='ij'))
  out = np.zeros_like(image)
  for i in range(b):
    coords = grid + np.moveaxis(disp[i], -1, 0)
    coords = np.stack([np.clip(coords[a], 0, n - 1) for a, n in enumerate((nx, ny, nz))])
    for ch in range(c):
      out[i, ..., ch] = ndimage.map_coordinates(image[i, ..., ch], coords, order=1)
  return out


def _jax_reference_warp(image, disp):
  """Autodiff reference (jax.scipy map_coordinates, index clamping == coordinate clamping)."""
  grid = jnp.moveaxis(W.identity_grid(image.shape[1:4]), -1, 0)
  def one(img, d):
    coords = grid + jnp.moveaxis(d, -1, 0)
    return jnp.stack([jax.scipy.ndimage.map_coordinates(img[..., ch], list(coords), order=1,
                                                        mode='nearest')
                      for ch in range(img.shape[-1])], -1)
  return jax.vmap(one)(image, disp)


def test_identity_grid():
  g = W.identity_grid((2, 3, 4))
  assert g.shape == (2, 3, 4, 3)
  np.testing.assert_array_equal(g[1, 2, 3], [1, 2, 3])


def test_warp_matches_scipy_including_outside_points():
  image = RNG.normal(size=(2, 9, 8, 7, 2)).astype(np.float32)
  disp = RNG.normal(scale=3.0, size=(2, 9, 8, 7, 3)).astype(np.float32)  # many points outside
  got = jax.jit(W.warp)(image, disp)
  np.testing.assert_allclose(got, _numpy_warp(image, disp), atol=1e-5)


def test_warp_custom_gradient_matches_autodiff_reference():
  image = jnp.asarray(RNG.normal(size=(2, 6, 7, 5, 3)), jnp.float32)
  disp = jnp.asarray(RNG.normal(scale=2.0, size=(2, 6, 7, 5, 3)), jnp.float32)
  weights = jnp.asarray(RNG.normal(size=image.shape), jnp.float32)
  loss = lambda f: lambda i, d: jnp.sum(jnp.sin(f(i, d)) * weights)
  got = jax.jit(jax.grad(loss(W.warp), argnums=(0, 1)))(image, disp)
  ref = jax.grad(loss(_jax_reference_warp), argnums=(0, 1))(image, disp)
  np.testing.assert_allclose(got[0], ref[0], atol=1e-5)
  np.testing.assert_allclose(got[1], ref[1], atol=1e-4)


def test_zero_displacement_is_exact_identity():
  image = RNG.normal(size=(1, 5, 6, 7, 2)).astype(np.float32)
  np.testing.assert_array_equal(W.warp(image, np.zeros((1, 5, 6, 7, 3), np.float32)), image)


def test_integer_shift_equals_roll_in_interior():
  image = RNG.normal(size=(1, S, S, S, 1)).astype(np.float32)
  shift = np.array([2.0, -1.0, 3.0], np.float32)
  disp = np.broadcast_to(shift, (1, S, S, S, 3))
  got = np.asarray(jax.jit(W.warp)(image, disp))
  want = np.roll(image, shift=(-2, 1, -3), axis=(1, 2, 3))  # out[p] = image[p + shift]
  np.testing.assert_allclose(got[:, 1:S - 2, 1:S - 1, 0:S - 3], want[:, 1:S - 2, 1:S - 1, 0:S - 3],
                             atol=1e-6)


def test_warp_nan_displacement_gives_nan_not_crash():
  image = np.ones((1, 4, 4, 4, 1), np.float32)
  disp = np.zeros((1, 4, 4, 4, 3), np.float32)
  disp[0, 1, 1, 1] = np.nan
  out = np.asarray(jax.jit(W.warp)(image, disp))
  assert np.isnan(out[0, 1, 1, 1, 0]) and np.isfinite(np.delete(out.ravel(), 21)).all()


def test_zero_velocity_or_zero_years_gives_zero_displacement():
  v = _smooth_velocity()
  np.testing.assert_array_equal(W.integrate_velocity(np.zeros_like(v), np.ones(2)), 0.0)
  np.testing.assert_array_equal(W.integrate_velocity(v, np.zeros(2)), 0.0)


def test_constant_velocity_gives_constant_displacement():
  c = np.array([0.7, -1.2, 0.3], np.float32)
  v = np.broadcast_to(c, (2, S, S, S, 3))
  years = np.array([1.0, 2.5], np.float32)
  d = np.asarray(jax.jit(W.integrate_velocity)(v, years))
  want = c * years[:, None, None, None, None]
  np.testing.assert_allclose(d[:, 3:-3, 3:-3, 3:-3], np.broadcast_to(want, d.shape)[:, 3:-3, 3:-3, 3:-3],
                             atol=1e-5)


def test_linear_contraction_matches_exponential_and_volume_change():
  a, t = 0.1, 3.0  # v(x) = -a (x - c); phi_t(x) = c + (x - c) exp(-a t)
  center = (S - 1) / 2
  x = np.asarray(W.identity_grid((S, S, S)))
  v = (-a * (x - center))[None].astype(np.float32)
  d = np.asarray(jax.jit(W.integrate_velocity)(v, np.array([t], np.float32)))
  want = (np.exp(-a * t) - 1.0) * (x - center)
  np.testing.assert_allclose(d[0], want, atol=5e-3 * np.abs(want).max())
  det = np.asarray(W.jacobian_determinant(d))[0]
  np.testing.assert_allclose(det[2:-2, 2:-2, 2:-2], np.exp(-3 * a * t), rtol=5e-3)
  region = (slice(4, 12),) * 3  # integrated volume change of a central cube
  np.testing.assert_allclose(det[region].sum() / det[region].size, np.exp(-3 * a * t), rtol=5e-3)


def test_composition_of_intervals():
  v = _smooth_velocity(max_abs=1.0, seed=1)
  t1, t2 = np.array([1.0, 0.5], np.float32), np.array([0.5, 2.0], np.float32)
  integrate = jax.jit(W.integrate_velocity)
  d1, d2, d12 = integrate(v, t1), integrate(v, t2), integrate(v, t1 + t2)
  composed = np.asarray(jax.jit(W.compose)(d1, d2))
  inner = (slice(None),) + (slice(3, -3),) * 3
  err = np.abs(composed - np.asarray(d12))[inner]
  assert err.max() < 0.01 * np.abs(np.asarray(d12)).max()
  # Images: warping by d2 then by d1 equals warping by compose(d1, d2).
  image = ndimage.gaussian_filter(RNG.normal(size=(2, S, S, S, 1)), (0, 2, 2, 2, 0)).astype(np.float32)
  twice = W.warp(W.warp(image, d2), d1)
  np.testing.assert_allclose(np.asarray(twice)[inner], np.asarray(W.warp(image, composed))[inner],
                             atol=0.05 * np.abs(image).max())
  # Negative years invert: phi_{-t} o phi_t = id.
  back = np.asarray(W.compose(d1, integrate(v, -t1)))
  assert np.abs(back[inner]).max() < 0.01


def test_smooth_random_velocity_is_diffeomorphic():
  v = _smooth_velocity(max_abs=2.0, seed=2)
  d = jax.jit(W.integrate_velocity)(v, np.array([2.0, 3.0], np.float32))
  assert np.abs(np.asarray(d)).max() > 2.0  # a real deformation, not a no-op
  det = np.asarray(W.jacobian_determinant(d))
  assert det.min() > 0.0


def test_jacobian_matches_numpy_gradient():
  d = RNG.normal(scale=0.3, size=(2, 5, 6, 7, 3)).astype(np.float32)
  got = np.asarray(jax.jit(W.jacobian_determinant)(d))
  want = np.zeros(got.shape)
  for b in range(2):
    jac = np.stack([np.stack(np.gradient(d[b, ..., i], axis=(0, 1, 2)), -1) for i in range(3)], -2)
    want[b] = np.linalg.det(jac + np.eye(3))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_upsample_field_is_cell_centred_linear_and_clamped():
  coarse = np.broadcast_to(np.arange(4, dtype=np.float32)[:, None, None, None], (4, 3, 2, 1))[None]
  fine = np.asarray(W.upsample_field(coarse, 2))
  assert fine.shape == (1, 8, 6, 4, 1)
  want = np.clip((np.arange(8) + 0.5) / 2 - 0.5, 0, 3)  # 0, 0.25, 0.75, ..., 2.75, 3
  np.testing.assert_allclose(fine[0, :, 2, 1, 0], want, atol=1e-6)
  np.testing.assert_allclose(W.upsample_field(coarse, 3)[0, :, 0, 0, 0],
                             np.clip((np.arange(12) + 0.5) / 3 - 0.5, 0, 3), atol=1e-6)


def test_integrate_with_upsampling_constant_velocity():
  c = np.array([0.5, 0.0, -0.25], np.float32)
  v = np.broadcast_to(c, (1, 8, 8, 8, 3))  # fine voxels per year, on the coarse grid
  d = np.asarray(W.integrate_velocity(v, np.array([2.0], np.float32), upsample_factor=2))
  assert d.shape == (1, 16, 16, 16, 3)
  np.testing.assert_allclose(d, np.broadcast_to(2 * c, d.shape), atol=1e-5)


def test_warp_labels_onehot_moves_labels_and_stays_normalised():
  labels = np.zeros((1, 8, 8, 8), np.int32)
  labels[0, 2:5, 2:5, 2:5] = 1
  onehot = jax.nn.one_hot(labels, 2)
  disp = np.broadcast_to(np.array([-1.0, 0.0, 0.0], np.float32), (1, 8, 8, 8, 3))
  soft = np.asarray(W.warp_labels_onehot(onehot, disp))
  np.testing.assert_allclose(soft.sum(-1), 1.0, atol=1e-6)
  assert np.array_equal(soft.argmax(-1)[0, 3:6, 2:5, 2:5], np.ones((3, 3, 3)))
  assert soft.argmax(-1)[0, 2, 3, 3] == 0


def test_shape_errors():
  with pytest.raises(ProgressionError, match='share'):
    W.warp(np.zeros((1, 4, 4, 4, 1)), np.zeros((1, 4, 4, 5, 3)))
  with pytest.raises(ProgressionError, match='displacement'):
    W.warp(np.zeros((1, 4, 4, 4, 1)), np.zeros((1, 4, 4, 4, 2)))
  with pytest.raises(ProgressionError, match='years'):
    W.integrate_velocity(np.zeros((2, 4, 4, 4, 3)), np.zeros(3))
  with pytest.raises(ProgressionError, match='upsample_factor'):
    W.integrate_velocity(np.zeros((1, 4, 4, 4, 3)), np.zeros(1), upsample_factor=0)


def test_custom_gradients_of_jacobian_and_upsampling_match_autodiff():
  # Both have hand-written VJPs (autodiff's transposed slices are slow on CPU).
  d = jnp.asarray(RNG.normal(scale=0.3, size=(2, 5, 2, 4, 3)), jnp.float32)  # a size-2 axis too
  w = jnp.asarray(RNG.normal(size=(2, 5, 2, 4)), jnp.float32)
  planar = jnp.moveaxis(d, -1, 0)
  ref = jax.grad(lambda p: jnp.sum(W._det3(W._jacobian_parts(p)) * w))(planar)
  got = jax.jit(jax.grad(lambda p: jnp.sum(W._jacobian_det_planar(p) * w)))(planar)
  np.testing.assert_allclose(got, ref, atol=1e-5)
  for factor in (2, 3):
    field = jnp.asarray(RNG.normal(size=(2, 4, 1, 3, 2)), jnp.float32)
    wf = jnp.asarray(RNG.normal(size=(2, 4 * factor, factor, 3 * factor, 2)), jnp.float32)

    def reference(f):  # gathers + weights, differentiated by jax
      for axis in (1, 2, 3):
        n = f.shape[axis]
        c = np.clip((np.arange(n * factor) + 0.5) / factor - 0.5, 0, n - 1)
        i0 = np.floor(c).astype(int)
        t = (c - i0).reshape([-1 if a == axis else 1 for a in range(5)])
        f = jnp.take(f, i0, axis) * (1 - t) + jnp.take(f, np.minimum(i0 + 1, n - 1), axis) * t
      return f

    np.testing.assert_allclose(W.upsample_field(field, factor), reference(field), atol=1e-6)
    g_ref = jax.grad(lambda f: jnp.sum(reference(f) * wf))(field)
    g_got = jax.jit(jax.grad(lambda f: jnp.sum(W.upsample_field(f, factor) * wf)))(field)
    np.testing.assert_allclose(g_got, g_ref, atol=1e-5)


def test_flow_equals_separate_calls():
  v = _smooth_velocity(batch=2, shape=(8, 8, 8), seed=3)
  image = RNG.normal(size=(2, 16, 16, 16, 1)).astype(np.float32)
  years = np.array([1.5, -0.5], np.float32)
  d, warped, jac = jax.jit(W.flow, static_argnums=(3, 4))(image, v, years, 7, 2)
  d_ref = W.integrate_velocity(v, years, upsample_factor=2)
  np.testing.assert_allclose(d, d_ref, atol=1e-6)
  np.testing.assert_allclose(warped, W.warp(image, d_ref), atol=1e-5)
  np.testing.assert_allclose(jac, W.jacobian_determinant(d_ref), atol=1e-5)
  with pytest.raises(ProgressionError, match='upsample_factor'):
    W.flow(image, v, years, 7, 3)
