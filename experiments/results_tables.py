"""RESULTS.md's tables and text from evaluation report folders (no flags: `results` has them).

Per headline region: MAE (mL) and mean |annualised-rate error| (%/year) of every method with
their 95 % CIs, the subject-level paired comparison of the model with each baseline and
reference (`comparisons.csv`), every region's MAE, the learning curve, the T1w-only
(tissue-volume) evaluation and a with/without comparison of runs. It only reads the files;
nothing is recomputed.
"""

import json
from pathlib import Path

import pandas as pd

from progression.evaluation import figures, report

_METHOD_ORDER = ('model', 'regional_model', 'population_rate', 'no_change', 'expected',
                 'oracle')


def _fmt(row) -> str:
  return f'{row["mean"]:.4g} [{row["ci95_low"]:.4g}, {row["ci95_high"]:.4g}]'


def method_table(summary: pd.DataFrame, regions) -> pd.DataFrame:
  """Method x region cells: MAE mL, rate error %/y and interval coverage (all pairs)."""
  overall = summary[summary.grouping == 'all']
  rows = []
  for method in pd.unique(overall.method):
    row = {'method': method}
    for region in regions:
      cells = overall[(overall.method == method) & (overall.region == region)].set_index('metric')
      for metric, label in (('abs_error_ml', 'MAE mL'), ('abs_rate_error_pct_per_year',
                                                         'rate err %/y'),
                            ('interval_covered', '90% coverage')):
        row[f'{region} {label}'] = _fmt(cells.loc[metric]) if metric in cells.index else ''
    rows.append(row)
  return pd.DataFrame(rows)


def comparison_table(comparisons: pd.DataFrame, regions) -> pd.DataFrame:
  """Model vs each other method: MAE ratio, paired mean difference [CI] (mL), verdict."""
  table = comparisons[(comparisons.metric == 'abs_error_ml')
                      & comparisons.region.isin(list(regions))]
  return pd.DataFrame({
      'region': table.region, 'model vs': table.versus,
      'MAE ratio': table.mae_ratio.map('{:.3f}'.format),
      'paired diff mL [95% CI]': [f'{d:.4f} [{lo:.4f}, {hi:.4f}]' for d, lo, hi in
                                  zip(table.mean_diff, table.ci95_low, table.ci95_high)],
      'verdict': [v + (' (reference)' if r else '') for v, r in
                  zip(table.verdict, table.is_reference)],
      'subjects': table.n_subjects})


def all_regions_table(summary: pd.DataFrame, comparisons: pd.DataFrame) -> pd.DataFrame:
  """Region x method MAE (mL, all pairs) for every region, and model vs population rate."""
  overall = summary[(summary.grouping == 'all') & (summary.metric == 'abs_error_ml')]
  mae = overall.pivot_table(index='region', columns='method', values='mean')
  mae = mae[[m for m in _METHOD_ORDER if m in mae.columns]]
  versus = comparisons[(comparisons.metric == 'abs_error_ml') & (comparisons.method == 'model')
                       & (comparisons.versus == 'population_rate')].set_index('region')
  mae['model - population mL [95% CI]'] = [
      f'{versus.loc[r, "mean_diff"]:.4g} [{versus.loc[r, "ci95_low"]:.4g}, '
      f'{versus.loc[r, "ci95_high"]:.4g}] {versus.loc[r, "verdict"]}' if r in versus.index
      else '' for r in mae.index]
  return mae.reset_index().round(4).astype(object).fillna('')


def robustness_table(reference_dir: Path, changed_dir: Path) -> pd.DataFrame:
  """Per region, MAE (mL) of the model and the other methods in two reports, the model's
  changed / reference, and model / regional_model in each (1: the pipeline kept the
  regional model's forecast under the changed conditions)."""
  mae = {}
  for name, folder in (('reference', reference_dir), ('changed', changed_dir)):
    summary = pd.read_csv(folder / 'summary.csv')
    rows = summary[(summary.grouping == 'all') & (summary.metric == 'abs_error_ml')]
    mae[name] = rows.pivot_table(index='region', columns='method', values='mean')
  methods = [m for m in _METHOD_ORDER if m in mae['reference'] and m in mae['changed']
             and m != 'no_change']
  table = pd.DataFrame({f'{m} {name}': mae[name][m] for m in methods
                        for name in ('reference', 'changed')})
  table['model changed / reference'] = table['model changed'] / table['model reference']
  if 'regional_model' in methods:
    for name in ('reference', 'changed'):
      table[f'model / regional_model {name}'] = (table[f'model {name}']
                                                 / table[f'regional_model {name}'])
  return table.reset_index().round(4).astype(object).fillna('')


def curve_table(curve: pd.DataFrame) -> pd.DataFrame:
  """Region x training subjects: MAE (mL) per method, and regional - population [95 % CI]."""
  mae = curve.pivot_table(index=['region', 'train_subjects'], columns='method',
                          values='mae_ml').reset_index()
  versus = curve[curve.method == 'population_rate'].set_index(['region', 'train_subjects'])
  mae['regional - population mL [95% CI]'] = [
      f'{versus.loc[(r, n), "regional_minus_method_ml"]:.4f} '
      f'[{versus.loc[(r, n), "ci95_low"]:.4f}, {versus.loc[(r, n), "ci95_high"]:.4f}]'
      for r, n in zip(mae.region, mae.train_subjects)]
  return mae.round(4)


def robustness_section(robustness: list[str], command: str = '') -> list[str]:
  """Markdown lines: the reference report (`robustness[0]`) vs each changed one after it."""
  lines = ['## Real-cohort conditions: the same run with and without them', '',
           f'Reference `{robustness[0]}`; each changed run below is compared with it (test '
           'split MAE, mL). A head moved by the simulator is rendered anew, with new noise, '
           'so that cohort differs in its voxels and regional model too (the `expected` '
           'reference shows how much the data alone move the errors); a head moved in its '
           'header only keeps the voxels, so what changes is what registration and '
           'resampling do. model / regional_model says whether the pipeline still delivers '
           'its regional model\'s forecast.', '']
  if command:
    lines += ['```', command, '```', '']
  for changed in robustness[1:]:
    lines += [f'### `{changed}`', '',
              figures.markdown_table(robustness_table(Path(robustness[0]), Path(changed))),
              '']
  return lines


def t1w_only_section(report_dir: Path, command: str = '') -> list[str]:
  """Markdown lines: a `--volume_method=tissue` report of a labelled cohort (every method on
  the tissue model's regions, the model without label maps)."""
  summary = pd.read_csv(report_dir / 'summary.csv')
  comparisons = pd.read_csv(report_dir / 'comparisons.csv')
  lines = ['## T1w only: the same checkpoint without label maps', '',
           f'`{report_dir}`: what a user with T1w images alone gets. Every method forecasts '
           'and is measured on the built-in tissue model\'s brain, grey matter, white matter '
           'and CSF; the model anchors on the regional model of those volumes that training '
           'also fitted (its tissue-model fallback), which is the regional_model row. Test '
           'split MAE (mL); the last column is the subject-level paired difference.', '']
  if command:
    lines += ['```', command, '```', '']
  return lines + [figures.markdown_table(all_regions_table(summary, comparisons)), '']


def render(report_dir: Path, workdir: Path | None, command: str,
           curve: Path | None = None, curve_command: str = '',
           robustness: list[str] | None = None, robustness_command: str = '',
           t1w_only: Path | None = None, t1w_only_command: str = '') -> str:
  summary = pd.read_csv(report_dir / 'summary.csv')
  comparisons = pd.read_csv(report_dir / 'comparisons.csv')
  regions = report.HEADLINE_REGIONS['labels'] + ('amygdala',)
  lines = ['# Results', '',
           'Regenerated by `python -m experiments.results` from the evaluation report folder '
           f'`{report_dir}`; do not edit by hand.', '']
  if workdir is not None and (workdir / 'metrics.jsonl').is_file():
    records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
    train = [r for r in records if r.get('split') == 'train']
    if train:
      lines += [f'Training: {train[-1]["step"]} steps (last logged train loss '
                f'{train[-1]["loss"]:.4g}).', '']
  if command:
    lines += ['Commands:', '', '```', command, '```', '']
  lines += ['## Test split: every method, all pairs (mean [95 % bootstrap CI])', '',
            figures.markdown_table(method_table(summary, regions)), '',
            'oracle applies each subject\'s true rates; expected applies the rate expected from '
            'what is observable at baseline (the best any forecaster can do); they are '
            'references, not competitors.', '',
            '## Model vs each method: subject-level paired bootstrap of |error| (mL)', '',
            figures.markdown_table(comparison_table(comparisons, regions)), '',
            '## Every region: MAE (mL) by method, and model vs population rate', '',
            figures.markdown_table(all_regions_table(summary, comparisons)), '']
  if curve is not None:
    table = pd.read_csv(curve)
    lines += ['## Learning curve: regional model vs population rate by training subjects', '',
              f'Test split of {int(table.test_subjects.iloc[0])} subjects; MAE in mL; the last '
              'column is the subject-level paired difference (negative: the regional model '
              'is better).', '']
    if curve_command:
      lines += ['```', curve_command, '```', '']
    lines += [figures.markdown_table(curve_table(table)), '']
  if t1w_only is not None:
    lines += t1w_only_section(t1w_only, t1w_only_command)
  if robustness:
    lines += robustness_section(robustness, robustness_command)
  return '\n'.join(lines) + '\n'
