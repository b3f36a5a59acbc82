"""Limited-data question: forecast error against the number of training subjects.

  python -m experiments.learning_curve --cohort=/runs/cohort400 --sizes=25,50,100,200 \
      --out=/runs/learning_curve.csv

For each size N, the regional model and the population rate are fitted on N training subjects
(a seeded subset of the training split; the validation split calibrates the intervals) and
scored on the whole test split, with no change and, on synthetic cohorts, the `oracle` and
`expected` references. Volumes come from the label maps, measured once. The table has, per
size x region x method, the MAE (mL) and the subject-level paired CI of regional_model minus
that method (`evaluation.comparisons`). The image model is not retrained here: at
initialisation it equals the regional model (its prior); see RESULTS.md for trained runs.
"""

from pathlib import Path

import numpy as np
import pandas as pd
from absl import app, flags

from experiments import common
from progression import cohort, regional_intervals, regional_model
from progression.evaluation import baselines, comparisons, references
from progression.progress import ProgressBar

_COHORT = flags.DEFINE_string('cohort', None, 'Synthetic or real cohort folder (label maps).')
_SPEC = flags.DEFINE_string('spec', 'synthetic', 'Cohort spec name or path.')
_SIZES = flags.DEFINE_list('sizes', ['25', '50', '100', '200'], 'Training subjects per fit.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seeds the split and the subsets.')
_OUT = flags.DEFINE_string('out', 'learning_curve.csv', 'CSV to write.')
flags.mark_flag_as_required('cohort')
REGIONS = ('hippocampus', 'amygdala', 'lateral_ventricles', 'whole_brain')


def _split(root: str) -> dict[str, pd.DataFrame]:
  pairs = cohort.make_pairs(cohort.read_visits(cohort.load_spec(_SPEC.value), root))
  split = cohort.split_subjects(sorted(pairs.subject.unique()), (0.6, 0.2, 0.2),
                                seed=_SEED.value)
  return {s: pairs[pairs.subject.map(split) == s].reset_index(drop=True)
          for s in ('train', 'val', 'test')}


def _measured(pairs: pd.DataFrame, name: str) -> tuple[pd.DataFrame, list]:
  table = baselines.training_volume_table(pairs, 'labels', ProgressBar(f'{name} pairs measured'))
  return table, [cohort.covariates_of(row) for row in pairs.to_dict('records')]


def _rows(method: str, test: pd.DataFrame, table: pd.DataFrame, predict) -> list[dict]:
  """Evaluation rows (`comparisons` layout) of one method on the measured test pairs."""
  per_pair = len(pd.unique(table.region))
  rows = []
  for i, pair in enumerate(test.to_dict('records')):
    chunk = table.iloc[i * per_pair:(i + 1) * per_pair]
    v0, v1 = (dict(zip(chunk.region, chunk[c])) for c in ('baseline_ml', 'followup_ml'))
    years = float(pair['interval_years'])
    predicted = predict(pair, v0, years)
    for region in REGIONS:
      true_rate, rate = baselines.annualized_rate_pct([v0[region]] * 2,
                                                      [v1[region], predicted[region]], years)
      rows.append({'subject': pair['subject'], 'baseline_session': pair['baseline_session'],
                   'followup_session': pair['followup_session'], 'method': method,
                   'region': region, 'abs_error_ml': abs(predicted[region] - v1[region]),
                   'abs_rate_error_pct_per_year': abs(rate - true_rate)})
  return rows


def learning_curve(root: str, sizes: list[int], seed: int) -> pd.DataFrame:
  """The table described in the module docstring."""
  splits = _split(root)
  (train_table, train_covs), (val_table, val_covs), (test_table, _) = (
      _measured(splits[s], s) for s in ('train', 'val', 'test'))
  refs = references.reference_methods(root, 'labels')
  fixed = [('no_change', lambda pair, v0, years: v0)]
  for ref in refs:
    fixed.append((ref.name, lambda pair, v0, years, r=ref: {
        k: v * (1 + r.rates[str(pair['subject'])].get(k, np.nan) / 100) ** years
        for k, v in v0.items()}))
  subjects = sorted(splits['train'].subject.unique())
  out = []
  for size in sizes:
    chosen = set(np.random.default_rng([seed, size]).permutation(subjects)[:size])
    keep = splits['train'].subject.isin(chosen).to_numpy()
    per_pair = len(pd.unique(train_table.region))
    table = train_table[np.repeat(keep, per_pair)].reset_index(drop=True)
    covs = [c for c, k in zip(train_covs, keep) if k]
    model = regional_intervals.calibrate(regional_model.fit(table, covs, 'labels', seed=seed),
                                     val_table, val_covs)
    rates = baselines.fit_population_rates(table, 'labels')
    methods = [('regional_model', lambda pair, v0, years: model.predict_volumes_ml(
                   cohort.covariates_of(pair), v0, years)),
               ('population_rate', lambda pair, v0, years: rates.predict_volumes_ml(
                   v0, pair['diagnosis'], pair['age_years'], years))] + fixed
    rows = pd.DataFrame([r for name, fn in methods
                         for r in _rows(name, splits['test'], test_table, fn)])
    paired = comparisons.paired_comparisons(rows, candidate='regional_model')
    paired = paired[paired.metric == 'abs_error_ml'].set_index(['region', 'versus'])
    for (region, method), group in rows.groupby(['region', 'method']):
      cell = paired.loc[(region, method)] if (region, method) in paired.index else None
      out.append({'train_subjects': len(chosen), 'region': region, 'method': method,
                  'mae_ml': group.abs_error_ml.mean(),
                  'rate_error_pct_per_year': group.abs_rate_error_pct_per_year.mean(),
                  'regional_minus_method_ml': None if cell is None else cell.mean_diff,
                  'ci95_low': None if cell is None else cell.ci95_low,
                  'ci95_high': None if cell is None else cell.ci95_high,
                  'test_subjects': splits['test'].subject.nunique()})
  return pd.DataFrame(out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  table = learning_curve(_COHORT.value, [int(s) for s in _SIZES.value], _SEED.value)
  out = Path(_OUT.value)
  tmp = out.with_name(f'.{out.name}.tmp')
  table.to_csv(tmp, index=False, float_format='%.6g')
  tmp.replace(out)
  pivot = table.pivot_table(index=['region', 'train_subjects'], columns='method', values='mae_ml')
  print(pivot.round(4).to_string())


if __name__ == '__main__':
  common.run(main)
