"""Tests for progression.regional_compact: the compact ridge on constructed features."""

import numpy as np
import pytest

from progression import regional_compact


def test_recovers_a_linear_rate_and_fills_missing_values_with_the_training_mean():
  rng = np.random.default_rng(0)
  x = np.stack([rng.integers(18, 31, 2000).astype(float), rng.uniform(0.003, 0.006, 2000)], 1)
  y = -0.01 - 0.004 * (30 - x[:, 0]) + 5.0 * (x[:, 1] - 0.0045)
  features = x.copy()
  features[::10, 0] = np.nan  # a tenth of the MMSE values missing
  model = regional_compact.fit(features, {'hippocampus': y}, ['hippocampus'])
  assert model.fill[0] == pytest.approx(np.nanmean(features[:, 0]))
  rate = lambda mmse, fraction: model.log_rates(np.array([mmse, fraction]))['hippocampus']
  # The filled tenth of the rows (MMSE at its mean, rates not) barely bends the slope.
  assert rate(25.0, 0.0045) - rate(24.0, 0.0045) == pytest.approx(0.004, rel=0.05)
  assert rate(np.nan, 0.0045) == pytest.approx(rate(model.fill[0], 0.0045))
  restored = regional_compact.CompactRidge.from_dict(model.to_dict())
  assert restored.log_rates(np.array([22.0, 0.004])) == model.log_rates(np.array([22.0, 0.004]))


def test_blend_weight_halves_at_25_subjects_and_decays():
  assert regional_compact.blend_weight(25) == 0.5
  assert regional_compact.blend_weight(225) == pytest.approx(0.1)
  assert regional_compact.blend_weight(0) == 1.0
