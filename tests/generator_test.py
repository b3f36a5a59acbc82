"""ProgressionGenerator: shapes, identity at t=0 and at init, one code path, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from progression.errors import ProgressionError
from progression.models import generator as gen
from progression.models import warp as warp_lib

COND = 6
S = 16


def _inputs(batch=2, seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  baseline = jax.random.uniform(k1, (batch, S, S, S, 1))
  return baseline, jnp.array([1.0, 2.5][:batch]), jax.random.normal(k2, (batch, COND))


def _boost_velocity_head(params, scale=0.3):
  """Make the (tiny at init) velocity head produce a visible deformation."""
  head = dict(params['params']['velocity_head'])
  head['kernel'] = scale * jax.random.normal(jax.random.PRNGKey(7), head['kernel'].shape)
  return {'params': {**params['params'], 'velocity_head': head}}


@pytest.fixture(scope='module')
def model_and_params():
  m = gen.ProgressionGenerator(features=(4, 8), cond_dim=COND)
  baseline, years, cov = _inputs()
  params = m.init(jax.random.PRNGKey(0), baseline, years, cov)
  return m, _boost_velocity_head(params)


def test_outputs_shapes_and_dtypes(model_and_params):
  m, params = model_and_params
  baseline, years, cov = _inputs()
  out = jax.jit(m.apply)(params, baseline, years, cov)
  assert set(out) == {'velocity', 'displacement', 'prediction', 'jacobian'}
  assert out['velocity'].shape == (2, S // 2, S // 2, S // 2, 3)  # downsize 2
  assert out['displacement'].shape == (2, S, S, S, 3)
  assert out['prediction'].shape == (2, S, S, S, 1)
  assert out['jacobian'].shape == (2, S, S, S)
  assert all(v.dtype == jnp.float32 for v in out.values())
  assert float(jnp.abs(out['displacement']).max()) > 0.1  # boosted head: a real deformation


def test_zero_years_returns_baseline_exactly(model_and_params):
  m, params = model_and_params
  baseline, _, cov = _inputs()
  out = jax.jit(m.apply)(params, baseline, jnp.zeros(2), cov)
  np.testing.assert_array_equal(out['prediction'], baseline)
  np.testing.assert_array_equal(out['displacement'], 0.0)
  np.testing.assert_array_equal(out['jacobian'], 1.0)


def test_starts_near_identity():
  m = gen.ProgressionGenerator(features=(4, 8), cond_dim=COND)
  baseline, years, cov = _inputs()
  out = m.apply(m.init(jax.random.PRNGKey(1), baseline, years, cov), baseline, years, cov)
  assert float(jnp.abs(out['displacement']).max()) < 1e-2
  np.testing.assert_allclose(out['prediction'], baseline, atol=1e-2)


def test_velocity_method_and_forecast_share_one_path(model_and_params):
  m, params = model_and_params
  baseline, years, cov = _inputs()
  out = m.apply(params, baseline, years, cov)
  v = m.apply(params, baseline, cov, method=m.velocity)
  np.testing.assert_array_equal(v, out['velocity'])
  again = gen.forecast_from_velocity(baseline, v, years, m.num_squarings)
  for k in out:
    np.testing.assert_allclose(again[k], out[k], atol=1e-6)
  # The velocity does not depend on the interval; horizons compose.
  other = m.apply(params, baseline, 3.0 * years, cov)
  np.testing.assert_array_equal(other['velocity'], out['velocity'])


def test_forecast_horizons_compose_on_the_model_grid():
  # A smooth coarse velocity (as training produces): phi_{t1+t2} = phi_{t2} o phi_{t1}.
  baseline, years, _ = _inputs()
  coarse = np.stack(np.meshgrid(*[np.linspace(-1, 1, S // 2)] * 3, indexing='ij'), -1)
  v = jnp.asarray(np.stack([0.4 * np.sin(2 * coarse[..., ::-1] + b) for b in range(2)]),
                  jnp.float32)  # voxels/year of the 16^3 model grid, on the 8^3 grid
  d1 = gen.forecast_from_velocity(baseline, v, years)['displacement']
  d2 = gen.forecast_from_velocity(baseline, v, 2.0 * years)['displacement']
  d3 = gen.forecast_from_velocity(baseline, v, 3.0 * years)['displacement']
  inner = (slice(None),) + (slice(2, -2),) * 3
  err = np.abs(np.asarray(warp_lib.compose(d1, d2) - d3))[inner]
  assert float(jnp.abs(d3).max()) > 1.0
  # Up to linear-interpolation error of upsampling a curved field from the 2x coarser grid.
  assert err.max() < 0.05 * float(jnp.abs(d3).max())


def test_full_resolution_and_velocity_bound():
  m = gen.ProgressionGenerator(features=(4, 8), cond_dim=COND, downsize=1,
                               max_velocity_voxels_per_year=0.5)
  baseline, years, cov = _inputs()
  params = _boost_velocity_head(m.init(jax.random.PRNGKey(2), baseline, years, cov), 10.0)
  out = m.apply(params, baseline, years, cov)
  assert out['velocity'].shape == (2, S, S, S, 3)
  assert float(jnp.abs(out['velocity']).max()) <= 0.5
  assert float(jnp.abs(out['velocity']).max()) > 0.4  # the tanh bound is active


def test_intensity_residual_head():
  m = gen.ProgressionGenerator(features=(4, 8), cond_dim=COND, intensity_residual=True)
  baseline, years, cov = _inputs()
  params = m.init(jax.random.PRNGKey(3), baseline, years, cov)
  head = params['params']['intensity_head']
  assert head['kernel'].shape[-1] == 8 and not np.any(np.asarray(head['kernel']))
  params['params']['intensity_head'] = {**head, 'bias': jnp.full_like(head['bias'], 0.1)}
  out = m.apply(params, baseline, years, cov)
  assert out['intensity_rate'].shape == (2, S, S, S, 1)
  np.testing.assert_allclose(out['intensity_rate'], 0.1, atol=1e-6)
  warped = warp_lib.warp(baseline, out['displacement'])
  np.testing.assert_allclose(out['prediction'], warped + 0.1 * years[:, None, None, None, None],
                             atol=1e-5)
  zero = m.apply(params, baseline, jnp.zeros(2), cov)
  np.testing.assert_array_equal(zero['prediction'], baseline)


def test_bfloat16_compute(model_and_params):
  _, params = model_and_params
  m16 = gen.ProgressionGenerator(features=(4, 8), cond_dim=COND, dtype=jnp.bfloat16)
  baseline, years, cov = _inputs()
  out = m16.apply(params, baseline, years, cov)
  assert out['prediction'].dtype == jnp.float32 and out['velocity'].dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  ref = gen.ProgressionGenerator(features=(4, 8), cond_dim=COND).apply(params, baseline, years,
                                                                        cov)
  np.testing.assert_allclose(out['displacement'], ref['displacement'],
                             atol=0.1 * float(jnp.abs(ref['displacement']).max()))


def test_gradients_are_finite_and_reach_the_unet(model_and_params):
  m, params = model_and_params
  baseline, years, cov = _inputs()
  target = jnp.roll(baseline, 1, axis=1)
  loss = lambda p: jnp.mean((m.apply(p, baseline, years, cov)['prediction'] - target) ** 2)
  grads = jax.jit(jax.grad(loss))(params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert np.any(np.asarray(grads['params']['unet']['enc0']['conv1']['kernel']))


def test_input_errors(model_and_params):
  m, params = model_and_params
  baseline, years, cov = _inputs()
  with pytest.raises(ProgressionError, match='cond_dim'):
    m.apply(params, baseline, years, cov[:, :4])
  with pytest.raises(ProgressionError, match='divisible by 4'):
    m.apply(params, baseline[:, :14, :14, :14], years, cov)
  with pytest.raises(ProgressionError, match='years'):
    m.apply(params, baseline, years[:1], cov)
  with pytest.raises(ProgressionError, match='integer multiple'):
    gen.forecast_from_velocity(baseline, jnp.zeros((2, 5, 5, 5, 3)), years)
