"""Who wins: subject-level paired comparisons of a candidate method against the others.

Evaluation rows (`report.ROW_COLUMNS`: one per pair x region x method) hold several pairs
per subject, and the pairs of one subject are not independent (same anatomy, same rates,
overlapping intervals). So a comparison is made per SUBJECT:

1. the candidate's and the other method's rows are matched on the pair and region
   (`PAIR_KEY` + region); a pair where either value is non-finite is dropped (pairwise);
2. each subject gets d_s = mean over its pairs of (candidate value - other value), e.g. of
   |error| in mL: negative d_s means the candidate is closer to the real follow-up;
3. the mean over subjects of d_s gets a percentile bootstrap CI that resamples SUBJECTS
   with replacement (all pairs of a subject enter or leave together), seeded, so the same
   seed gives the same CI (`bootstrap_ci` on the subject means).

Methods: `BASELINE_METHODS` are competitors; `REFERENCE_METHODS` (synthetic cohorts only:
'oracle' applies each subject's true rates to the baseline volumes, 'expected' the rate
expected from what is observable at baseline, the best any forecaster can do) are yardsticks,
not competitors: their rows are computed alike but flagged `is_reference`.

`bootstrap_ci` also serves `report.summarize` (pair-level CIs of the summary).
"""

from collections.abc import Sequence

import numpy as np
import pandas as pd

from progression.errors import ProgressionError

REFERENCE_METHODS = ('oracle', 'expected')
BASELINE_METHODS = ('regional_model', 'population_rate', 'no_change')
# The columns naming one pair of visits in evaluation rows.
PAIR_KEY = ('subject', 'baseline_session', 'followup_session')
# Compared metrics (per pair x region, lower is better) -> unit of their values.
METRICS = {'abs_error_ml': 'mL', 'abs_rate_error_pct_per_year': '%/y'}
# paired_comparisons columns. One row per metric x region x other method; values of
# `candidate_mae`, `versus_mae`, `mean_diff` and the CI are in `unit` (`METRICS`).
COMPARISON_COLUMNS = ('metric', 'unit', 'region', 'method', 'versus', 'is_reference',
                      'n_subjects', 'n_pairs', 'candidate_mae', 'versus_mae', 'mae_ratio',
                      'mean_diff', 'ci95_low', 'ci95_high', 'verdict')
VERDICTS = ('better', 'worse', 'tie')


def bootstrap_ci(values: np.ndarray, num_bootstrap: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
  """Percentile bootstrap confidence interval of the mean (seeded, so reproducible).

  Args:
    values: 1-D sample (finite); one value returns (value, value).
    num_bootstrap: number of resamples (each of `values.size` draws with replacement).
    seed: `np.random.default_rng` seed.
    level: coverage, e.g. 0.95 for the 2.5th and 97.5th percentiles of the resampled means.

  Returns:
    (low, high) in the unit of `values`.
  """
  values = np.asarray(values, dtype=np.float64)
  if values.size == 1:
    return float(values[0]), float(values[0])
  rng = np.random.default_rng(seed)
  means = values[rng.integers(0, values.size, (num_bootstrap, values.size))].mean(axis=1)
  tail = 100.0 * (1.0 - level) / 2.0
  low, high = np.percentile(means, [tail, 100.0 - tail])
  return float(low), float(high)


def verdict(ci_low: float, ci_high: float) -> str:
  """'better' when the CI of (candidate - other) lies below 0, 'worse' above 0, else 'tie'."""
  if ci_high < 0.0:
    return 'better'
  if ci_low > 0.0:
    return 'worse'
  return 'tie'


def paired_comparisons(rows: pd.DataFrame, candidate: str = 'model',
                       num_bootstrap: int = 2000, seed: int = 0,
                       level: float = 0.95) -> pd.DataFrame:
  """The candidate against every other method, per region and metric (`COMPARISON_COLUMNS`).

  For each metric of `METRICS` ('abs_error_ml': |predicted - true| follow-up volume in mL;
  'abs_rate_error_pct_per_year': |predicted - true| annualised rate in percent/year), each
  region and each other method (competitors first in `BASELINE_METHODS` order, then other
  methods by appearance, references last):

  - `n_subjects`, `n_pairs`: subjects and pairs with finite values for both methods;
  - `candidate_mae`, `versus_mae`: means over subjects of each subject's mean over its pairs
    (every subject weighs the same; equal to the pair means when subjects have as many pairs);
  - `mae_ratio` = candidate_mae / versus_mae (inf when only the other method is exact,
    NaN when both are);
  - `mean_diff` = mean over subjects of d_s (= candidate_mae - versus_mae), with
    `ci95_low`/`ci95_high` its subject-level bootstrap CI at `level` (see the module
    docstring; NaN with fewer than 2 subjects);
  - `verdict` ('better', 'worse', 'tie'; `verdict`); always 'tie' without a CI;
  - `is_reference`: the other method is in `REFERENCE_METHODS` (a yardstick, not a rival).

  Regions or methods without a finite pair are left out. The same `seed` is used for every
  comparison, so the output is reproducible.

  Args:
    rows: evaluation rows (`report.evaluate_pairs(...).rows`, or `pairs.csv`): needs
      `PAIR_KEY`, 'method', 'region' and the `METRICS` columns.
    candidate: the method compared with all others (the learned model by default).
    num_bootstrap, seed, level: of `bootstrap_ci`.

  Returns:
    A DataFrame with `COMPARISON_COLUMNS`; empty (with those columns) when `candidate` has
    no rows.

  Raises:
    ProgressionError: missing columns, or a pair x region x method given twice.
  """
  missing = [c for c in (*PAIR_KEY, 'method', 'region', *METRICS) if c not in rows.columns]
  if missing:
    raise ProgressionError(f'paired_comparisons: evaluation rows lack the columns {missing}')
  key = [*PAIR_KEY, 'region']
  twice = rows.duplicated([*key, 'method'])
  if twice.any():
    first = rows[twice].iloc[0]
    raise ProgressionError(
        f'paired_comparisons: {int(twice.sum())} rows repeat a pair x region x method, e.g. '
        + ', '.join(f'{c}={first[c]!r}' for c in [*key, 'method']))
  if candidate not in set(rows['method']):
    return pd.DataFrame(columns=list(COMPARISON_COLUMNS))
  mine = rows[rows['method'] == candidate]
  records = []
  for metric, unit in METRICS.items():
    for region in pd.unique(mine['region']):
      ours = mine.loc[mine['region'] == region, [*PAIR_KEY, metric]]
      for versus in _others(rows['method'], candidate):
        theirs = rows.loc[(rows['method'] == versus) & (rows['region'] == region),
                          [*PAIR_KEY, metric]]
        record = _compare(ours, theirs, metric, num_bootstrap, seed, level)
        if record is not None:
          records.append({'metric': metric, 'unit': unit, 'region': region,
                          'method': candidate, 'versus': versus,
                          'is_reference': versus in REFERENCE_METHODS, **record})
  return pd.DataFrame.from_records(records, columns=list(COMPARISON_COLUMNS))


def subject_differences(ours: pd.DataFrame, theirs: pd.DataFrame, metric: str
                        ) -> pd.DataFrame:
  """Per subject (sorted ids): mean over its pairs of `metric` for both methods and `n_pairs`.

  `ours`, `theirs`: rows of one region for the candidate and the other method (`PAIR_KEY`
  and `metric` columns); matched on `PAIR_KEY`, non-finite pairs dropped pairwise.
  Returns columns 'subject', 'candidate', 'versus', 'diff' (candidate - versus), 'n_pairs'.
  """
  paired = ours.merge(theirs, on=list(PAIR_KEY), suffixes=('_a', '_b'))
  a = paired[f'{metric}_a'].to_numpy(np.float64)
  b = paired[f'{metric}_b'].to_numpy(np.float64)
  finite = np.isfinite(a) & np.isfinite(b)
  table = pd.DataFrame({'subject': paired['subject'].to_numpy()[finite], 'candidate': a[finite],
                        'versus': b[finite]})
  per_subject = table.groupby('subject', sort=True).agg(
      candidate=('candidate', 'mean'), versus=('versus', 'mean'),
      n_pairs=('candidate', 'size')).reset_index()
  per_subject['diff'] = per_subject['candidate'] - per_subject['versus']
  return per_subject[['subject', 'candidate', 'versus', 'diff', 'n_pairs']]


def _compare(ours: pd.DataFrame, theirs: pd.DataFrame, metric: str, num_bootstrap: int,
             seed: int, level: float) -> dict | None:
  per_subject = subject_differences(ours, theirs, metric)
  if per_subject.empty:
    return None
  diffs = per_subject['diff'].to_numpy(np.float64)
  candidate_mae = float(per_subject['candidate'].mean())
  versus_mae = float(per_subject['versus'].mean())
  if diffs.size >= 2:
    low, high = bootstrap_ci(diffs, num_bootstrap, seed, level)
  else:
    low = high = float('nan')
  return {'n_subjects': int(diffs.size), 'n_pairs': int(per_subject['n_pairs'].sum()),
          'candidate_mae': candidate_mae, 'versus_mae': versus_mae,
          'mae_ratio': _ratio(candidate_mae, versus_mae), 'mean_diff': float(diffs.mean()),
          'ci95_low': low, 'ci95_high': high,
          'verdict': 'tie' if diffs.size < 2 else verdict(low, high)}


def _ratio(numerator: float, denominator: float) -> float:
  if denominator > 0:
    return numerator / denominator
  return float('nan') if numerator == 0 else float('inf')


def _others(methods: pd.Series, candidate: str) -> list[str]:
  """Methods other than the candidate: baselines in their order, others, references last."""
  present = [m for m in pd.unique(methods) if m != candidate]
  rank = lambda m: (m in REFERENCE_METHODS,
                    BASELINE_METHODS.index(m) if m in BASELINE_METHODS else len(BASELINE_METHODS))
  return sorted(present, key=rank)  # Stable: ties keep their order of appearance.


def who_wins_table(comparisons: pd.DataFrame, regions: Sequence[str]) -> pd.DataFrame:
  """The report's "Who wins" table: candidate vs each competitor in `regions`.

  One row per region x non-reference method of `paired_comparisons`: the subjects, the MAE
  ratio (follow-up volume), and per metric the mean difference (candidate - other) with its
  95 % subject-bootstrap CI and the verdict. Empty when there is nothing to compare.
  """
  competitors = comparisons[~comparisons['is_reference'].astype(bool)
                            & comparisons['region'].isin(list(regions))]
  by_metric = {m: competitors[competitors['metric'] == m].set_index(['region', 'versus'])
               for m in METRICS}
  volume = by_metric['abs_error_ml']
  candidate = competitors['method'].iloc[0] if len(competitors) else 'model'
  order = sorted(volume.index, key=lambda k: list(regions).index(k[0]))  # Stable.
  records = []
  for region, versus in order:
    v = volume.loc[(region, versus)]
    record = {'region': region, f'{candidate} vs': versus, 'subjects': int(v['n_subjects']),
              'MAE ratio (volume)': f'{v["mae_ratio"]:.3g}',
              'volume MAE difference (mL) [95 % CI]': _diff_cell(v),
              'volume verdict': v['verdict']}
    rate = by_metric['abs_rate_error_pct_per_year']
    if (region, versus) in rate.index:
      r = rate.loc[(region, versus)]
      record['rate MAE difference (%/y) [95 % CI]'] = _diff_cell(r)
      record['rate verdict'] = r['verdict']
    records.append(record)
  return pd.DataFrame.from_records(records)


def _diff_cell(row: pd.Series) -> str:
  if not np.isfinite(row['ci95_low']):
    return f'{row["mean_diff"]:+.3g} [no CI: {int(row["n_subjects"])} subject]'
  return f'{row["mean_diff"]:+.3g} [{row["ci95_low"]:+.3g}, {row["ci95_high"]:+.3g}]'
