"""Known-answer tests for progression.evaluation.baselines (no model needed)."""

import json

import numpy as np
import pandas as pd
import pytest

from progression import cohort, io
from progression import labels as L
from progression.errors import ProgressionError
from progression.evaluation import baselines, tissue

TRUE_RATES = {  # region -> diagnosis -> compound percent/year at age 70.
    'hippocampus': {'CN': -1.4, 'MCI': -2.75, 'AD': -4.7},
    'lateral_ventricles': {'CN': 3.0, 'MCI': 7.0, 'AD': 12.0},
}
TRUE_AGE_SLOPES = {'hippocampus': -0.05, 'lateral_ventricles': 0.2}  # percent/year per year


def _rate(region, diagnosis, age):
  return TRUE_RATES[region][diagnosis] + TRUE_AGE_SLOPES[region] * (age - 70.0)


def _constructed_table(diagnoses=('CN', 'MCI', 'AD')) -> pd.DataFrame:
  """Pairs whose volumes follow the rates exactly; AD subjects are older (age confound)."""
  rows = []
  for k, dx in enumerate(diagnoses):
    for i in range(8):
      age = 66.0 + 3.0 * k + 1.5 * i  # Within-group spread 10.5 years, groups shifted.
      for years in (1.0, 2.0, 3.5):
        for region in TRUE_RATES:
          v0 = 3.0 + 0.1 * i
          v1 = v0 * (1.0 + _rate(region, dx, age) / 100.0) ** years
          rows.append({'diagnosis': dx, 'age_years': age, 'interval_years': years,
                       'region': region, 'baseline_ml': v0, 'followup_ml': v1})
  return pd.DataFrame(rows)


def test_population_fit_recovers_known_rates_and_age_slope():
  rates = baselines.fit_population_rates(_constructed_table(), 'labels')
  for region, slope in TRUE_AGE_SLOPES.items():
    assert rates.age_slope_pct_per_year2[region] == pytest.approx(slope, abs=1e-9)
    for dx in ('CN', 'MCI', 'AD'):
      for age in (68.0, 72.5, 80.0):
        assert rates.rate_pct_per_year(region, dx, age) == pytest.approx(
            _rate(region, dx, age), abs=1e-9)
  assert rates.num_pairs['hippocampus'] == {'all': 72, 'CN': 24, 'MCI': 24, 'AD': 24}


def test_unseen_or_missing_diagnosis_falls_back_to_all_subjects_rate():
  table = _constructed_table(diagnoses=('CN', 'MCI'))
  rates = baselines.fit_population_rates(table, 'labels')
  center = rates.age_center_years
  expected_all = np.mean([_rate('hippocampus', dx, center) for dx in ('CN', 'MCI')])
  assert rates.rates_pct_per_year['hippocampus']['all'] == pytest.approx(expected_all, abs=1e-9)
  assert 'AD' not in rates.rates_pct_per_year['hippocampus']
  for diagnosis in ('AD', None):
    assert rates.rate_pct_per_year('hippocampus', diagnosis, center) == pytest.approx(
        expected_all, abs=1e-9)
  # Missing age: no age term.
  assert rates.rate_pct_per_year('hippocampus', 'CN', None) == pytest.approx(
      _rate('hippocampus', 'CN', center), abs=1e-9)


def test_ages_outside_the_training_range_are_clipped():
  rates = baselines.fit_population_rates(_constructed_table(), 'labels')
  oldest = rates.age_range_years[1]
  assert rates.rate_pct_per_year('lateral_ventricles', 'AD', oldest + 30.0) == pytest.approx(
      rates.rate_pct_per_year('lateral_ventricles', 'AD', oldest))


def test_age_term_is_dropped_when_the_data_do_not_support_it():
  rng = np.random.default_rng(0)
  table = _constructed_table()
  # Few pairs: no age term even without noise.
  assert baselines.fit_population_rates(table.iloc[:16], 'labels').age_slope_pct_per_year2[
      'hippocampus'] == 0.0
  # Noise much larger than the age effect: the slope is not distinguishable from 0.
  noisy = table.assign(followup_ml=table.followup_ml * np.exp(rng.normal(0, 0.3, len(table))))
  slopes = baselines.fit_population_rates(noisy, 'labels').age_slope_pct_per_year2
  assert slopes['hippocampus'] == 0.0


def test_predicted_volumes_compound_and_json_round_trip():
  rates = baselines.fit_population_rates(_constructed_table(), 'labels')
  restored = baselines.PopulationRates.from_dict(json.loads(json.dumps(rates.to_dict())))
  assert restored == rates
  predicted = restored.predict_volumes_ml({'hippocampus': 4.0, 'lateral_ventricles': 20.0},
                                          'AD', 75.0, years=2.5)
  assert predicted['hippocampus'] == pytest.approx(
      4.0 * (1 + _rate('hippocampus', 'AD', 75.0) / 100) ** 2.5, rel=1e-9)
  assert predicted['lateral_ventricles'] == pytest.approx(
      20.0 * (1 + _rate('lateral_ventricles', 'AD', 75.0) / 100) ** 2.5, rel=1e-9)
  with pytest.raises(ProgressionError, match='not fitted'):
    restored.rate_pct_per_year('thalamus', 'AD', 75.0)
  with pytest.raises(ProgressionError, match='malformed'):
    baselines.PopulationRates.from_dict({'volume_method': 'labels'})


def test_fit_rejects_bad_tables():
  with pytest.raises(ProgressionError, match='no training pairs'):
    baselines.fit_population_rates(_constructed_table().iloc[:0], 'labels')
  with pytest.raises(ProgressionError, match='followup_ml'):
    baselines.fit_population_rates(_constructed_table().drop(columns='followup_ml'), 'labels')


def test_annualized_rate_is_compound_and_nan_where_undefined():
  rate = baselines.annualized_rate_pct([10.0, 0.0, 5.0], [10.0 * 0.98 ** 3, 1.0, 5.0],
                                       [3.0, 1.0, 0.0])
  assert rate[0] == pytest.approx(-2.0, abs=1e-12)
  assert np.isnan(rate[1]) and np.isnan(rate[2])


def _labels_volume():
  seg = np.zeros((12, 12, 12), np.int32)
  seg[2:5, 2:6, 2:4] = L.LEFT_HIPPOCAMPUS  # 24 voxels
  seg[6:9, 6:8, 6:8] = L.RIGHT_LATERAL_VENTRICLE  # 12 voxels
  return io.from_array(seg, np.diag([2.0, 2.0, 2.0, 1.0]))  # 8 mm^3 voxels


def test_no_change_baseline_returns_the_baseline():
  labels = _labels_volume()
  image = io.from_array(np.random.default_rng(0).random((12, 12, 12)), labels.affine)
  prediction = baselines.NoChangeBaseline('labels').predict({'interval_years': 3.0}, image,
                                                            labels)
  np.testing.assert_array_equal(prediction.image, image.data)
  assert prediction.volumes_ml['hippocampus'] == pytest.approx(24 * 0.008)
  assert prediction.volumes_ml['lateral_ventricles'] == pytest.approx(12 * 0.008)
  assert prediction.volume_method == 'labels'


def test_population_rate_baseline_applies_rates_to_the_baseline_volumes():
  labels = _labels_volume()
  fitted = baselines.fit_population_rates(_constructed_table(), 'labels')
  others = {r: {'all': -1.0} for r in L.REGIONS if r not in TRUE_RATES}
  rates = baselines.PopulationRates.from_dict({
      **fitted.to_dict(), 'rates_pct_per_year': {**fitted.rates_pct_per_year, **others},
      'age_slope_pct_per_year2': {**fitted.age_slope_pct_per_year2,
                                  **{r: 0.0 for r in others}}})
  row = {'interval_years': 2.0, 'diagnosis': 'MCI', 'age_years': 71.0}
  prediction = baselines.PopulationRateBaseline(rates).predict(row, labels, labels)
  np.testing.assert_array_equal(prediction.image, labels.data)
  assert prediction.volumes_ml['hippocampus'] == pytest.approx(
      24 * 0.008 * (1 + _rate('hippocampus', 'MCI', 71.0) / 100) ** 2, rel=1e-9)
  assert prediction.volumes_ml['lateral_ventricles'] == pytest.approx(
      12 * 0.008 * (1 + _rate('lateral_ventricles', 'MCI', 71.0) / 100) ** 2, rel=1e-9)
  assert prediction.volumes_ml['amygdala'] == 0.0
  # A row with missing covariates (NaN age, no diagnosis) gets the all-subjects rate.
  bare = baselines.PopulationRateBaseline(rates).predict(
      {'interval_years': 1.0, 'diagnosis': None, 'age_years': float('nan')}, labels, labels)
  assert bare.volumes_ml['hippocampus'] == pytest.approx(
      24 * 0.008 * (1 + rates.rates_pct_per_year['hippocampus']['all'] / 100), rel=1e-9)


def test_training_volumes_match_the_simulator_and_rates_match_its_targets(synthetic_cohort):
  _, pairs = cohort.load_cohort('synthetic', synthetic_cohort)
  assert baselines.volume_method_of(pairs) == 'labels'
  done = []
  table = baselines.training_volume_table(pairs, 'labels', progress=lambda d, n: done.append(d))
  assert done == list(range(1, len(pairs) + 1))
  assert len(table) == len(pairs) * len(L.REGIONS)
  # Volumes agree with the simulator's own voxel counts (ground_truth.tsv).
  truth = pd.read_csv(synthetic_cohort / 'ground_truth.tsv', sep='\t').set_index(
      ['subject', 'session'])
  for pair_index, pair in enumerate(pairs.itertuples()):
    rows = table.iloc[pair_index * len(L.REGIONS):(pair_index + 1) * len(L.REGIONS)]
    for row in rows.itertuples():
      assert row.baseline_ml == pytest.approx(
          truth.loc[(pair.subject, pair.baseline_session), f'{row.region}_ml'], abs=1e-4)
      assert row.followup_ml == pytest.approx(
          truth.loc[(pair.subject, pair.followup_session), f'{row.region}_ml'], abs=1e-4)
  # Large structures are measured precisely at 4 mm: rates land near the simulator's targets.
  rates = baselines.fit_population_rates(table, 'labels').rates_pct_per_year
  brain, ventricles = rates['whole_brain'], rates['lateral_ventricles']
  assert brain['AD'] < brain['MCI'] < brain['CN'] < 0
  assert 0 < ventricles['CN'] < ventricles['MCI'] < ventricles['AD']
  for dx, target in {'CN': -0.5, 'MCI': -1.2, 'AD': -1.9}.items():
    assert brain[dx] == pytest.approx(target, abs=0.5)


def test_tissue_volumes_without_label_maps():
  labels = np.zeros((24, 24, 24), np.int32)
  labels[4:20, 4:20, 4:20] = 3  # WM block (brightest)
  labels[8:16, 8:16, 8:16] = 2  # GM core
  labels[11:13, 11:13, 11:13] = 1  # CSF centre (darkest)
  image_data = np.choose(labels, [0.0, 0.25, 0.6, 1.0]) + np.random.default_rng(1).normal(
      0, 0.01, labels.shape)
  image = io.from_array(image_data.astype(np.float32), np.eye(4))
  measured = baselines.measure_volumes_ml(image, None, 'tissue')
  assert set(measured) == set(baselines.TISSUE_REGIONS)
  assert measured['brain'] == pytest.approx(measured['gray_matter'] + measured['white_matter'])
  seg = tissue.segment_tissue(image.data, tissue.brain_mask(image.data))
  assert measured['white_matter'] == pytest.approx(np.count_nonzero(seg == 3) / 1000.0)
  with pytest.raises(ProgressionError, match='needs a label map'):
    baselines.measure_volumes_ml(image, None, 'labels')
  with pytest.raises(ProgressionError, match='volume_method'):
    baselines.measure_volumes_ml(image, None, 'voxels')
