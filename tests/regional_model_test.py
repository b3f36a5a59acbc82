"""Tests for progression.regional_model: known answers on constructed pairs."""

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

from progression import covariates, regional_intervals, regional_model, regional_ridge
from progression.errors import ProgressionError

REGIONS = ('hippocampus', 'whole_brain', 'csf', 'lateral_ventricles')


def _cohort(n_subjects: int, seed: int, noise: float = 0.0):
  """Pairs whose annual log change is a known linear function of MMSE and hippocampal fraction."""
  rng = np.random.default_rng(seed)
  records, covs = [], []
  for s in range(n_subjects):
    dx = ('CN', 'MCI', 'AD')[s % 3]
    mmse = float(rng.integers(18, 31))
    hippocampus = rng.uniform(5.0, 9.0)
    baseline = {'hippocampus': hippocampus, 'whole_brain': 1100.0, 'csf': 300.0,
                'lateral_ventricles': 30.0}
    rate = -0.01 - 0.004 * (30 - mmse) + 0.02 * (math.log(hippocampus / 1430.0) + 5.3)
    for years in (1.0, 2.0):
      followup = {r: v * math.exp(years * (rate if r == 'hippocampus' else -0.005))
                  * math.exp(noise * rng.normal()) for r, v in baseline.items()}
      records += [{'subject': f's{s}', 'diagnosis': dx, 'age_years': 70.0,
                   'interval_years': years, 'region': r, 'baseline_ml': baseline[r],
                   'followup_ml': followup[r]} for r in REGIONS]
      covs.append(covariates.Covariates(age_years=70.0, sex='F', diagnosis=dx, mmse=mmse))
  return pd.DataFrame(records), covs


def test_recovers_a_known_linear_rate():
  table, covs = _cohort(60, seed=0)
  model = regional_model.fit(table, covs, 'labels')
  baseline = {'hippocampus': 6.0, 'whole_brain': 1100.0, 'csf': 300.0,
              'lateral_ventricles': 30.0}
  cov = covariates.Covariates(age_years=70.0, sex='F', diagnosis='MCI', mmse=24.0)
  truth = -0.01 - 0.004 * 6 + 0.02 * (math.log(6.0 / 1430.0) + 5.3)
  assert model.log_rates(cov, baseline)['hippocampus'] == pytest.approx(truth, abs=2e-3)
  assert model.log_rates(cov, baseline)['whole_brain'] == pytest.approx(-0.005, abs=1e-3)
  predicted = model.predict_volumes_ml(cov, baseline, 2.0)['hippocampus']
  assert predicted == pytest.approx(6.0 * math.exp(2.0 * truth), rel=5e-3)
  restored = regional_model.RegionalModel.from_dict(model.to_dict())
  assert restored.log_rates(cov, baseline) == model.log_rates(cov, baseline)


def _correlated_scores_cohort(n_subjects: int, seed: int):
  """Exact rates from MMSE alone, with CDR-SB a close proxy of MMSE (as in real cohorts)."""
  rng = np.random.default_rng(seed)
  records, covs = [], []
  for s in range(n_subjects):
    mmse = float(rng.integers(18, 31))
    cdrsb = max(round((30 - mmse) / 3 + rng.normal(0, 0.25), 1), 0.0)
    baseline = {'hippocampus': rng.uniform(5.0, 9.0), 'whole_brain': 1100.0, 'csf': 300.0,
                'lateral_ventricles': 30.0}
    rate = -0.01 - 0.004 * (30 - mmse)
    for years in (1.0, 2.0):
      records += [{'subject': f's{s}', 'interval_years': years, 'region': r, 'baseline_ml': v,
                   'followup_ml': v * math.exp(years * (rate if r == 'hippocampus' else -0.005))}
                  for r, v in baseline.items()]
      covs.append(covariates.Covariates(diagnosis=('CN', 'MCI', 'AD')[s % 3], mmse=mmse,
                                        cdrsb=cdrsb))
  return pd.DataFrame(records), covs


def test_complete_covariates_use_the_fit_without_dropout_copies_when_it_validates_better():
  """Masking MMSE in a copy moves its weight onto CDR-SB, which blurs exact rates.

  Cross-validation leaves the copies out; the fit with them is kept for forecasts that lack
  a covariate field training had.
  """
  table, covs = _correlated_scores_cohort(60, seed=0)
  model = regional_model.fit(table, covs, 'labels')
  assert not model.augmented['hippocampus'] and 'hippocampus' in model.missing_coefficients
  assert model.given_fields == ('diagnosis', 'mmse', 'cdrsb')  # the fields training had
  baseline = {'hippocampus': 6.0, 'whole_brain': 1100.0, 'csf': 300.0,
              'lateral_ventricles': 30.0}
  errors = {'without': [], 'with': []}
  for cov in _correlated_scores_cohort(30, seed=1)[1]:
    x = np.concatenate([[1.0], model.features(cov, baseline)])
    truth = -0.01 - 0.004 * (30 - cov.mmse)
    assert model.full_log_rates(cov, baseline)['hippocampus'] == pytest.approx(
        x @ np.asarray(model.coefficients['hippocampus']))
    errors['without'].append(abs(model.full_log_rates(cov, baseline)['hippocampus'] - truth))
    errors['with'].append(abs(x @ np.asarray(model.missing_coefficients['hippocampus']) - truth))
  assert np.mean(errors['without']) < np.mean(errors['with'])
  complete = covariates.Covariates(diagnosis='MCI', mmse=24.0, cdrsb=2.0)
  no_score = dataclasses.replace(complete, cdrsb=None)
  x = np.concatenate([[1.0], model.features(no_score, baseline)])
  assert model.full_log_rates(no_score, baseline)['hippocampus'] == pytest.approx(
      x @ np.asarray(model.missing_coefficients['hippocampus']))


def test_missing_fields_are_learned_and_predicted():
  table, covs = _cohort(60, seed=1)
  model = regional_model.fit(table, covs, 'labels')
  assert 'mmse_missing' in model.feature_names
  baseline = {'hippocampus': 6.0, 'whole_brain': 1100.0, 'csf': 300.0,
              'lateral_ventricles': 30.0}
  low = model.log_rates(covariates.Covariates(diagnosis='AD', mmse=19.0), baseline)
  missing = model.log_rates(covariates.Covariates(diagnosis='AD'), baseline)
  high = model.log_rates(covariates.Covariates(diagnosis='AD', mmse=30.0), baseline)
  assert low['hippocampus'] < missing['hippocampus'] < high['hippocampus']


@pytest.mark.parametrize('pool_out_of_fold', [False, True])
def test_conformal_intervals_cover_new_pairs(pool_out_of_fold):
  train, train_covs = _cohort(90, seed=2, noise=0.01)
  val, val_covs = _cohort(30, seed=3, noise=0.01)
  model = regional_model.fit(train, train_covs, 'labels')
  extra = None
  if pool_out_of_fold:
    extra = regional_intervals.out_of_fold_scores(model, train, train_covs)
    assert all(len(v) == len(train_covs) for v in extra.values())  # one per training pair
  model = regional_intervals.calibrate(model, val, val_covs, coverage=0.9, extra_scores=extra)
  test, test_covs = _cohort(150, seed=4, noise=0.01)
  hits = []
  for i, cov in enumerate(test_covs):
    rows = test.iloc[i * len(REGIONS):(i + 1) * len(REGIONS)]
    baseline = dict(zip(rows.region, rows.baseline_ml))
    low, high = model.interval_ml(cov, baseline, rows.interval_years.iloc[0])['hippocampus']
    hits.append(low <= rows.followup_ml.iloc[0] <= high)
  assert 0.84 <= np.mean(hits) <= 0.97


def test_variance_components_against_a_constructed_case():
  years = np.array([1.0, 2.0, 1.0, 2.0] * 500)
  rng = np.random.default_rng(0)
  residual = (rng.normal(0, 0.01, years.size)
              + (rng.normal(0, 0.02, years.size) - rng.normal(0, 0.02, years.size)) / years)
  rate_var, meas_var = regional_ridge.variance_components(residual, years)
  assert math.sqrt(rate_var) == pytest.approx(0.01, rel=0.25)
  assert math.sqrt(meas_var) == pytest.approx(0.02, rel=0.1)


def test_bad_inputs():
  table, covs = _cohort(6, seed=0)
  with pytest.raises(ProgressionError, match='covariate rows'):
    regional_model.fit(table, covs[:-1], 'labels')
  with pytest.raises(ProgressionError, match='malformed'):
    regional_model.RegionalModel.from_dict({'regions': []})


def test_a_region_most_label_maps_lack_is_left_out_not_the_pairs():
  table, covs = _cohort(30, seed=5)
  table.loc[table.region == 'csf', ['baseline_ml', 'followup_ml']] = 0.0
  model = regional_intervals.calibrate(regional_model.fit(table, covs, 'labels'), table, covs)
  assert 'csf' not in model.regions and 'hippocampus' in model.regions
  assert model.num_subjects == 30
  baseline = {'hippocampus': 6.0, 'whole_brain': 1100.0, 'csf': 0.0, 'lateral_ventricles': 30.0}
  predicted = model.predict_volumes_ml(covs[0], baseline, 1.0)
  assert set(predicted) == set(model.regions) and predicted['hippocampus'] < 6.0 * 1.1


def test_penalty_is_chosen_by_cross_validation():
  """Noise-free rates keep the smallest penalty; pure noise on few subjects a large one."""
  table, covs = _cohort(60, seed=3)
  exact = regional_model.fit(table, covs, 'labels')
  assert exact.penalty['hippocampus'] == min(regional_model.PENALTIES)
  noisy_table, noisy_covs = _cohort(15, seed=4, noise=0.05)
  noisy = regional_model.fit(noisy_table, noisy_covs, 'labels')
  # Whole brain's true rate is one constant: every feature fits only noise.
  assert noisy.penalty['whole_brain'] >= 100.0
  restored = regional_model.RegionalModel.from_dict(noisy.to_dict())
  assert restored.penalty == noisy.penalty


def test_anatomy_features_are_the_atrophy_markers_with_labels_and_every_class_without():
  table, covs = _cohort(30, seed=6)
  labelled = regional_model.fit(table, covs, 'labels')
  assert labelled.anatomy_regions == ('hippocampus', 'lateral_ventricles')
  assert set(labelled.regions) == set(REGIONS)  # every region is still predicted
  tissue_table = table.replace({'region': {'hippocampus': 'gm', 'whole_brain': 'brain',
                                           'lateral_ventricles': 'wm'}})
  tissue = regional_model.fit(tissue_table, covs, 'tissue')
  assert set(tissue.anatomy_regions) == {'gm', 'brain', 'csf', 'wm'}


def test_a_saved_model_with_other_features_predicts_with_its_own():
  """A checkpoint saved with every region's fraction and no interactions keeps forecasting."""
  table, covs = _cohort(30, seed=7)
  data = regional_model.fit(table, covs, 'labels').to_dict()
  kept = [i for i, f in enumerate(data['feature_names']) if '*' not in f]
  names = [data['feature_names'][i] for i in kept] + ['logfrac_csf']
  data.update(feature_names=names, mean=[0.0] * len(names), scale=[1.0] * len(names),
              coefficients={r: [0.0] * len(names) + [1.0] for r in data['regions']})
  for newer in ('interaction_factor', 'augmented', 'missing_coefficients', 'given_fields',
                'compact', 'compact_weight'):
    del data[newer]
  older = regional_model.RegionalModel.from_dict(data)
  assert older.anatomy_regions == ('hippocampus', 'lateral_ventricles', 'csf')
  baseline = {'hippocampus': 6.0, 'whole_brain': 1100.0, 'csf': 300.0,
              'lateral_ventricles': 30.0}
  expected = math.log(300.0 / 1430.0)  # Only the CSF fraction's coefficient is non-zero.
  assert older.log_rates(covs[0], baseline)['hippocampus'] == pytest.approx(expected)


def test_diagnosis_interactions_are_learned_when_a_score_matters_only_in_one_diagnosis():
  rng = np.random.default_rng(8)
  records, covs = [], []
  for s in range(300):
    dx, mmse = ('CN', 'MCI', 'AD')[s % 3], float(rng.integers(18, 31))
    rate = -0.02 - (0.005 * (30 - mmse) if dx == 'MCI' else 0.0)
    baseline = {'hippocampus': rng.uniform(5.0, 9.0), 'whole_brain': 1100.0, 'csf': 300.0,
                'lateral_ventricles': 30.0}
    records += [{'subject': f's{s}', 'interval_years': 1.0, 'region': r, 'baseline_ml': v,
                 'followup_ml': v * math.exp(rate if r == 'hippocampus' else -0.005)}
                for r, v in baseline.items()]
    covs.append(covariates.Covariates(diagnosis=dx, mmse=mmse))
  model = regional_model.fit(pd.DataFrame(records), covs, 'labels')
  assert model.interaction_factor['hippocampus'] < max(regional_model.INTERACTION_FACTORS)
  baseline = {'hippocampus': 6.0, 'whole_brain': 1100.0, 'csf': 300.0,
              'lateral_ventricles': 30.0}
  rate = lambda dx, mmse: model.log_rates(covariates.Covariates(diagnosis=dx, mmse=mmse),
                                          baseline)['hippocampus']
  # True MMSE slope: 0.005 / point in MCI, none in CN (one shared slope without interactions;
  # the uncentred products, nearly copies of their diagnosis column, shrink the difference:
  # to ~65 % here).
  mci_slope = (rate('MCI', 28.0) - rate('MCI', 20.0)) / 8.0
  cn_slope = (rate('CN', 28.0) - rate('CN', 20.0)) / 8.0
  assert 0.5 * 0.005 < mci_slope < 0.005 and abs(cn_slope) < 0.4 * mci_slope
  assert rate('MCI', 24.0) == pytest.approx(-0.05, abs=3e-3)


def test_rates_average_the_full_and_the_compact_ridge_by_training_subjects():
  table, covs = _cohort(60, seed=3, noise=0.01)
  model = regional_model.fit(table, covs, 'labels')
  assert model.num_subjects == 60
  assert model.compact_weight == pytest.approx(25.0 / 85.0)
  assert model.compact.anatomy_regions == ('hippocampus', 'lateral_ventricles')
  baseline = {'hippocampus': 6.0, 'whole_brain': 1100.0, 'csf': 300.0,
              'lateral_ventricles': 30.0}
  cov = covariates.Covariates(age_years=70.0, sex='F', diagnosis='MCI', mmse=24.0)
  full = model.full_log_rates(cov, baseline)
  compact = model.compact.log_rates(np.array([1.0, 0.0, 70.0, 0.0, np.nan, 24.0, np.nan,
                                              6.0 / 1430.0, 30.0 / 1430.0]))
  w = model.compact_weight
  for region, rate in model.log_rates(cov, baseline).items():
    assert rate == pytest.approx((1 - w) * full[region] + w * compact[region])
  assert compact['hippocampus'] != pytest.approx(full['hippocampus'], abs=1e-6)
  old = {k: v for k, v in model.to_dict().items() if k not in ('compact', 'compact_weight')}
  assert regional_model.RegionalModel.from_dict(old).log_rates(cov, baseline) == full
