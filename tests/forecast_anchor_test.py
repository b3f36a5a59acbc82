"""The input-grid rate correction of the anchored forecast (known answers, no network)."""

import numpy as np
import pytest

from progression import forecast_anchor
from progression.models import prior


def _inputs(rates):
  return forecast_anchor.PriorInputs('labels', np.zeros((2, 2, 2), np.uint8),
                                     np.asarray(rates, np.float32))


def test_headline_regions_are_the_ones_weighing_at_least_one():
  regions = prior.label_prior_regions()
  headline = dict(zip(regions.rate_regions, regions.headline))
  assert all(headline[r] for r in ('hippocampus', 'amygdala', 'lateral_ventricles',
                                   'whole_brain'))
  assert not any(headline[r] for r in ('thalamus', 'cortex', 'cerebral_wm', 'csf'))
  assert prior.tissue_prior_regions().headline == (True, True, False, False)


def test_rate_correction_meets_headline_rates_when_a_secondary_one_cannot_be_met():
  """A prior realising 97 % of each rate on the input grid, whose cortex never moves past 98 %
  of its first-order rate, and whose whole brain drifts with the cortex's correction (they
  share tissue): the headline rates come out exact, cortex keeps its first correction, and a
  region without a predicted rate (NaN) is left alone."""
  regions = prior.label_prior_regions()
  names = regions.rate_regions
  rates = np.array([-0.03, -0.025, 0.06, -0.008, np.nan, -0.01, -0.006, 0.02], np.float32)
  baseline_ml = {r: 10.0 for r in names}
  years = 2.0
  cortex, whole_brain = names.index('cortex'), names.index('whole_brain')

  def realised_rates(correction):
    shifted = np.nan_to_num(rates + correction)
    out = 0.97 * shifted
    out[cortex] = 0.98 * rates[cortex]  # cannot be met, whatever the correction
    out[whole_brain] += 0.2 * correction[cortex]
    return out

  def prior_only_ml(correction):
    return {r: baseline_ml[r] * float(np.exp(years * y))
            for r, y in zip(names, realised_rates(correction))}

  correction = forecast_anchor.RegionalAnchor.rate_correction(
      _inputs(rates), years, baseline_ml, prior_only_ml)
  final = realised_rates(correction)
  for k, name in enumerate(names):
    if regions.headline[k]:
      assert final[k] == pytest.approx(rates[k], rel=1e-3), name
  assert correction[names.index('thalamus')] == 0.0  # NaN rate: unconstrained
  assert correction[cortex] == pytest.approx(0.02 * rates[cortex], rel=1e-3)
