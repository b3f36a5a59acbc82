"""progression.evaluation.comparisons on constructed rows with known answers."""

import numpy as np
import pandas as pd
import pytest

from progression.errors import ProgressionError
from progression.evaluation import comparisons as C

# Subjects with 1, 2, 3, 2 and 3 pairs: the subject weighting is visible.
PAIRS_PER_SUBJECT = {'s1': 1, 's2': 2, 's3': 3, 's4': 2, 's5': 3}


def _rows(errors: dict[str, np.ndarray], regions=('hippocampus', 'whole_brain'),
          rate_scale: float = 0.5) -> pd.DataFrame:
  """Evaluation rows: `errors[method]` holds one |error| (mL) per pair (pairs in subject order).

  The rate error is `rate_scale` x the volume error + 1 (another metric, same ordering).
  Region r adds r mL to every error.
  """
  keys = [(s, 'ses-0', f'ses-{j + 1}') for s, n in PAIRS_PER_SUBJECT.items() for j in range(n)]
  records = []
  for method, values in errors.items():
    for r, region in enumerate(regions):
      for (subject, ses0, ses1), value in zip(keys, values):
        records.append({'subject': subject, 'baseline_session': ses0,
                        'followup_session': ses1, 'method': method, 'region': region,
                        'abs_error_ml': value + r,
                        'abs_rate_error_pct_per_year': rate_scale * (value + r) + 1.0})
  return pd.DataFrame.from_records(records)


def _num_pairs() -> int:
  return sum(PAIRS_PER_SUBJECT.values())


def _subject_means(rows, method, region, metric):
  """Independent: dict of subject -> mean of the method's values (plain Python loops)."""
  sums, counts = {}, {}
  for row in rows[(rows.method == method) & (rows.region == region)].itertuples():
    value = getattr(row, metric)
    sums[row.subject] = sums.get(row.subject, 0.0) + value
    counts[row.subject] = counts.get(row.subject, 0) + 1
  return {s: sums[s] / counts[s] for s in sums}


def _one(table, metric='abs_error_ml', region='hippocampus', versus='no_change'):
  part = table[(table.metric == metric) & (table.region == region) & (table.versus == versus)]
  assert len(part) == 1, part
  return part.iloc[0]


def test_candidate_better_for_every_subject_is_better_with_ci_below_zero():
  rng = np.random.default_rng(0)
  other = rng.uniform(1.0, 3.0, _num_pairs())
  rows = _rows({'model': other - rng.uniform(0.2, 0.8, _num_pairs()), 'no_change': other})
  table = C.paired_comparisons(rows)
  assert list(table.columns) == list(C.COMPARISON_COLUMNS)
  assert len(table) == 2 * 2  # 2 metrics x 2 regions x 1 other method.
  for metric in C.METRICS:
    for region in ('hippocampus', 'whole_brain'):
      row = _one(table, metric, region)
      assert row.verdict == 'better' and row.ci95_high < 0 and row.ci95_low <= row.mean_diff
      assert row.n_subjects == 5 and row.n_pairs == _num_pairs()
      assert row.method == 'model' and not row.is_reference
      assert row.unit == ('mL' if metric == 'abs_error_ml' else '%/y')
      # Known answer: subject-weighted means, independent of the implementation.
      model = _subject_means(rows, 'model', region, metric)
      still = _subject_means(rows, 'no_change', region, metric)
      assert row.candidate_mae == pytest.approx(np.mean(list(model.values())), rel=1e-12)
      assert row.versus_mae == pytest.approx(np.mean(list(still.values())), rel=1e-12)
      assert row.mean_diff == pytest.approx(row.candidate_mae - row.versus_mae, abs=1e-12)
      assert row.mae_ratio == pytest.approx(row.candidate_mae / row.versus_mae, rel=1e-12)
  # Subject weighting differs from pair weighting here (1 to 3 pairs per subject).
  pair_mean = rows[(rows.method == 'model') & (rows.region == 'hippocampus')].abs_error_ml.mean()
  assert _one(table).candidate_mae != pytest.approx(pair_mean, rel=1e-6)


def test_worse_and_identical_methods():
  rng = np.random.default_rng(1)
  other = rng.uniform(1.0, 3.0, _num_pairs())
  rows = _rows({'model': other + 1.0, 'no_change': other, 'population_rate': other})
  table = C.paired_comparisons(rows)
  worse = _one(table, versus='no_change')
  assert worse.verdict == 'worse' and worse.ci95_low > 0
  assert worse.mean_diff == pytest.approx(1.0) and worse.ci95_low == pytest.approx(1.0)
  same = C.paired_comparisons(_rows({'model': other, 'no_change': other}))
  for row in same.itertuples():
    assert row.mean_diff == 0.0 and row.ci95_low == 0.0 and row.ci95_high == 0.0
    assert row.verdict == 'tie' and row.mae_ratio == 1.0


def test_subject_bootstrap_matches_an_independent_numpy_computation():
  rng = np.random.default_rng(2)
  rows = _rows({'model': rng.uniform(0, 2, _num_pairs()),
                'no_change': rng.uniform(0, 2, _num_pairs())})
  for seed, num_bootstrap, level in ((0, 2000, 0.95), (7, 500, 0.9)):
    table = C.paired_comparisons(rows, num_bootstrap=num_bootstrap, seed=seed, level=level)
    for metric in C.METRICS:
      model = _subject_means(rows, 'model', 'whole_brain', metric)
      still = _subject_means(rows, 'no_change', 'whole_brain', metric)
      subjects = sorted(model)  # Subjects in sorted order, each resampled as one unit.
      d = np.array([model[s] - still[s] for s in subjects])
      draws = np.random.default_rng(seed).integers(0, d.size, (num_bootstrap, d.size))
      tail = 50 * (1 - level)
      want = np.percentile(d[draws].mean(axis=1), [tail, 100 - tail])
      row = _one(table, metric, 'whole_brain')
      np.testing.assert_allclose([row.ci95_low, row.ci95_high], want, rtol=1e-12, atol=1e-12)
      assert row.mean_diff == pytest.approx(d.mean(), abs=1e-12)
      assert row.verdict == C.verdict(*want)


def test_duplicating_pairs_within_subjects_does_not_narrow_the_ci():
  rng = np.random.default_rng(3)
  rows = _rows({'model': rng.normal(1.0, 1.0, _num_pairs()),
                'no_change': rng.normal(1.2, 1.0, _num_pairs())})
  copies = [rows.assign(followup_session=rows.followup_session + f'-copy{k}') for k in range(6)]
  duplicated = pd.concat(copies, ignore_index=True)
  once = _one(C.paired_comparisons(rows))
  six = _one(C.paired_comparisons(duplicated))
  assert six.n_pairs == 6 * once.n_pairs and six.n_subjects == once.n_subjects == 5
  assert (six.ci95_low, six.ci95_high) == pytest.approx((once.ci95_low, once.ci95_high),
                                                        abs=1e-12)
  # Pair-level resampling would treat the copies as new evidence: its CI shrinks ~sqrt(6).
  def pair_width(table):
    part = table[(table.region == 'hippocampus')]
    diff = (part[part.method == 'model'].abs_error_ml.to_numpy()
            - part[part.method == 'no_change'].abs_error_ml.to_numpy())
    low, high = C.bootstrap_ci(diff, 2000, 0)
    return high - low
  assert pair_width(duplicated) < 0.6 * pair_width(rows)


def test_same_seed_same_result_other_seed_other_ci():
  rng = np.random.default_rng(4)
  rows = _rows({'model': rng.uniform(0, 2, _num_pairs()),
                'no_change': rng.uniform(0, 2, _num_pairs())})
  a = C.paired_comparisons(rows, seed=11)
  pd.testing.assert_frame_equal(a, C.paired_comparisons(rows.sample(frac=1.0, random_state=0),
                                                        seed=11))  # Row order is irrelevant.
  b = C.paired_comparisons(rows, seed=12)
  ci = ['ci95_low', 'ci95_high']
  assert not np.allclose(a[ci], b[ci])
  pd.testing.assert_series_equal(a.mean_diff, b.mean_diff)


def test_non_finite_values_are_dropped_pairwise():
  rows = _rows({'model': np.full(_num_pairs(), 1.0), 'no_change': np.full(_num_pairs(), 2.0)})
  rate = 'abs_rate_error_pct_per_year'
  hippocampus = rows.region == 'hippocampus'
  model_rows = rows.index[hippocampus & (rows.method == 'model')]
  other_rows = rows.index[hippocampus & (rows.method == 'no_change')]
  rows.loc[model_rows[0], rate] = np.nan  # s1's only pair: s1 drops out.
  rows.loc[other_rows[1], rate] = np.inf  # One of s2's two pairs.
  table = C.paired_comparisons(rows)
  volume, rates = _one(table), _one(table, rate)
  assert (volume.n_pairs, volume.n_subjects) == (_num_pairs(), 5)
  assert (rates.n_pairs, rates.n_subjects) == (_num_pairs() - 2, 4)
  assert rates.mean_diff == pytest.approx(-0.5) and np.isfinite(rates.ci95_high)
  # A region with no finite pair at all is left out.
  rows.loc[rows.region == 'whole_brain', rate] = np.nan
  assert len(C.paired_comparisons(rows).query('region == "whole_brain"')) == 1


def test_methods_order_references_and_edge_cases():
  rng = np.random.default_rng(5)
  values = rng.uniform(1, 2, _num_pairs())
  rows = _rows({'oracle': np.zeros(_num_pairs()), 'no_change': values + 1, 'model': values,
                'expected': values - 0.5, 'population_rate': values + 0.5,
                'other': values})
  table = C.paired_comparisons(rows)
  part = table[(table.metric == 'abs_error_ml') & (table.region == 'hippocampus')]
  assert list(part.versus) == ['population_rate', 'no_change', 'other', 'oracle', 'expected']
  assert list(part.is_reference) == [False, False, False, True, True]
  assert list(part.verdict) == ['better', 'better', 'tie', 'worse', 'worse']
  assert _one(table, versus='oracle').mae_ratio == np.inf  # Only the oracle is exact.
  empty = C.paired_comparisons(rows, candidate='absent')
  assert empty.empty and list(empty.columns) == list(C.COMPARISON_COLUMNS)
  # One subject: no CI, so no verdict either way.
  single = C.paired_comparisons(rows[rows.subject == 's3'])
  assert single.ci95_low.isna().all() and (single.verdict == 'tie').all()
  assert (single.n_subjects == 1).all() and (single.n_pairs == 3).all()
  with pytest.raises(ProgressionError, match='repeat a pair x region x method'):
    C.paired_comparisons(pd.concat([rows, rows.iloc[:1]]))
  with pytest.raises(ProgressionError, match='lack the columns'):
    C.paired_comparisons(rows.drop(columns='subject'))


def test_who_wins_table_shows_competitors_of_the_headline_regions():
  rng = np.random.default_rng(6)
  values = rng.uniform(1, 2, _num_pairs())
  rows = _rows({'model': values, 'no_change': values + 1, 'oracle': np.zeros(_num_pairs())},
               regions=('csf', 'hippocampus', 'whole_brain'))
  table = C.who_wins_table(C.paired_comparisons(rows), ['whole_brain', 'hippocampus'])
  assert list(table['region']) == ['whole_brain', 'hippocampus']
  assert list(table['model vs']) == ['no_change', 'no_change']
  assert list(table['volume verdict']) == ['better', 'better']
  assert list(table['rate verdict']) == ['better', 'better']
  assert table['volume MAE difference (mL) [95 % CI]'][0] == '-1 [-1, -1]'
  assert C.who_wins_table(C.paired_comparisons(rows, candidate='absent'), ['csf']).empty
