"""Tests for experiments/results_tables.py: RESULTS.md tables from constructed report files."""

import pandas as pd

from experiments import results_tables as results


def _summary(mae: dict[tuple[str, str], float]) -> pd.DataFrame:
  return pd.DataFrame([{'grouping': 'all', 'group': 'all', 'method': m, 'region': r,
                        'metric': 'abs_error_ml', 'n': 10, 'mean': v, 'median': v,
                        'ci95_low': v * 0.8, 'ci95_high': v * 1.2}
                       for (m, r), v in mae.items()])


def _write(folder, mae):
  folder.mkdir()
  _summary(mae).to_csv(folder / 'summary.csv', index=False)
  return folder


def test_all_regions_table_orders_methods_and_states_the_verdict():
  summary = _summary({('population_rate', 'csf'): 4.0, ('model', 'csf'): 3.0,
                      ('no_change', 'csf'): 20.0, ('model', 'cortex'): 1.0,
                      ('population_rate', 'cortex'): 1.1, ('no_change', 'cortex'): 7.0})
  comparisons = pd.DataFrame([
      {'metric': 'abs_error_ml', 'method': 'model', 'versus': 'population_rate',
       'region': 'csf', 'mean_diff': -1.0, 'ci95_low': -1.5, 'ci95_high': -0.4,
       'verdict': 'better'}])
  table = results.all_regions_table(summary, comparisons).set_index('region')
  assert list(table.columns[:3]) == ['model', 'population_rate', 'no_change']
  assert table.loc['csf', 'model'] == 3.0
  assert table.loc['csf', 'model - population mL [95% CI]'] == '-1 [-1.5, -0.4] better'
  assert table.loc['cortex', 'model - population mL [95% CI]'] == ''


def test_robustness_table_gives_the_ratio_of_model_errors(tmp_path):
  reference = _write(tmp_path / 'a', {('model', 'hippocampus'): 0.04,
                                      ('regional_model', 'hippocampus'): 0.04,
                                      ('population_rate', 'hippocampus'): 0.05})
  changed = _write(tmp_path / 'b', {('model', 'hippocampus'): 0.042,
                                    ('regional_model', 'hippocampus'): 0.035,
                                    ('population_rate', 'hippocampus'): 0.05})
  row = results.robustness_table(reference, changed).set_index('region').loc['hippocampus']
  assert row['model changed / reference'] == 1.05
  assert row['model reference'] == 0.04 and row['population_rate changed'] == 0.05
  assert row['model / regional_model reference'] == 1.0
  assert row['model / regional_model changed'] == 1.2


def test_robustness_section_compares_every_changed_run_with_the_reference(tmp_path):
  mae = {(m, 'hippocampus'): v for m, v in (('model', 1.0), ('regional_model', 1.0),
                                            ('population_rate', 1.2))}
  reference = _write(tmp_path / 'reference', mae)
  moved = _write(tmp_path / 'moved', {k: v * 1.1 for k, v in mae.items()})
  header = _write(tmp_path / 'header', mae)
  text = '\n'.join(results.robustness_section([str(reference), str(moved), str(header)],
                                              'python -m experiments.train ...'))
  assert 'python -m experiments.train ...' in text
  sections = text.split('### ')[1:]
  assert [s.splitlines()[0] for s in sections] == [f'`{moved}`', f'`{header}`']
  assert '| 1.1 |' in sections[0] and '| 1.1 |' not in sections[1]  # model changed / ref


def test_t1w_only_section_tables_the_tissue_regions(tmp_path):
  folder = _write(tmp_path / 'tissue', {('model', 'brain'): 5.0, ('regional_model', 'brain'): 5.0,
                                        ('population_rate', 'brain'): 6.0,
                                        ('model', 'csf'): 2.0, ('population_rate', 'csf'): 2.5})
  pd.DataFrame([{'metric': 'abs_error_ml', 'method': 'model', 'versus': 'population_rate',
                 'region': 'brain', 'mean_diff': -1.0, 'ci95_low': -1.6, 'ci95_high': -0.5,
                 'verdict': 'better'}]).to_csv(folder / 'comparisons.csv', index=False)
  text = '\n'.join(results.t1w_only_section(folder, 'python -m experiments.evaluate ...'))
  assert text.startswith('## T1w only') and 'python -m experiments.evaluate ...' in text
  brain = next(l for l in text.splitlines() if l.startswith('| brain'))
  assert '| 5.0 | 5.0 | 6.0 |' in brain and '-1 [-1.6, -0.5] better' in brain
  assert any(l.startswith('| csf') for l in text.splitlines())
