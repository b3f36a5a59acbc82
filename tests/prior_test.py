"""The prior field realises the regional rates on a phantom's label map (known answers)."""

import jax.numpy as jnp
import numpy as np
import pytest

from progression import labels, phantom
from progression.models import prior, warp


@pytest.fixture(scope='module')
def classes():
  anat = phantom.sample_anatomy(np.random.default_rng(0), 192.0)
  world = phantom.world_grid((48, 48, 48), 4.0)
  ids, _ = phantom.render(anat, phantom.anatomical_coordinates(anat, world), 4.0, False)
  return ids, labels.ids_to_classes(ids)


def _consistent_rates(ids: np.ndarray) -> np.ndarray:
  """Annual log rates per `prior.RATE_REGIONS`; whole brain = its parts' volume-weighted mean."""
  rates = {'hippocampus': -0.047, 'amygdala': -0.04, 'lateral_ventricles': 0.12,
           'thalamus': -0.01, 'cortex': -0.012, 'cerebral_wm': -0.008, 'csf': 0.02}
  parts = ('hippocampus', 'amygdala', 'thalamus', 'cortex', 'cerebral_wm')
  count = {r: np.isin(ids, labels.REGIONS[r]).sum() for r in parts + ('whole_brain',)}
  rest = count['whole_brain'] - sum(count[r] for r in parts)
  rates['whole_brain'] = (sum(count[r] * rates[r] for r in parts) - 0.01 * rest
                          ) / count['whole_brain']
  return np.log1p([rates[r] for r in prior.RATE_REGIONS]).astype(np.float32)


@pytest.mark.parametrize('years', [1.0, 3.0])
def test_regional_changes_match_the_targets(classes, years):
  ids, cls = classes
  rates = _consistent_rates(ids)
  velocity = prior.prior_velocity(jnp.asarray(cls)[None], jnp.asarray(rates)[None],
                                  jnp.float32([years]), prior.label_prior_regions(), 2)
  # The model's displacement is a pull-back: volumes change by det of exp(-t v).
  push = warp.integrate_velocity(-velocity, jnp.float32([years]), 7, upsample_factor=2)
  jacobian = np.asarray(warp.jacobian_determinant(push)[0])
  for k, region in enumerate(prior.RATE_REGIONS):
    inside = np.isin(ids, labels.REGIONS[region])
    realised = np.log(jacobian[inside].mean()) / years
    # Cortex and WM are thin shells on an 8 mm velocity grid: 8 % of their change.
    share = 0.08 if region in ('cortex', 'cerebral_wm') else 0.02
    assert realised == pytest.approx(rates[k], abs=share * abs(rates[k]) + 5e-4), region


def test_zero_rates_give_a_zero_field(classes):
  _, cls = classes
  velocity = prior.prior_velocity(jnp.asarray(cls)[None], jnp.zeros((1, len(prior.RATE_REGIONS))), jnp.ones(1),
                                  prior.label_prior_regions(), 2)
  assert float(jnp.abs(velocity).max()) < 1e-6


def test_a_fresh_anchored_generator_is_its_prior(classes):
  import jax
  from progression.models import generator
  _, cls = classes
  regions = prior.label_prior_regions()
  model = generator.ProgressionGenerator(features=(4, 8), cond_dim=16, prior_regions=regions)
  image, years = jnp.zeros((1, 48, 48, 48, 1)), jnp.float32([2.0])
  cov, rates = jnp.zeros((1, 16)), jnp.log1p(jnp.float32(
      [[-0.03, -0.02, 0.08, -0.01, -0.01, -0.01, -0.005, 0.02]]))
  params = model.init(jax.random.PRNGKey(0), image, years, cov, prior_classes=cls[None],
                      prior_log_rates=rates)
  velocity = model.apply(params, image, cov, years, cls[None], rates, method=model.velocity)
  expected = prior.prior_velocity(jnp.asarray(cls)[None], rates, years, regions, 2)
  np.testing.assert_allclose(velocity, expected, atol=1e-7)
  assert float(jnp.abs(expected).max()) > 1e-3
