"""Statistics of a simulated cohort: measured vs target rates, and how much signal it holds.

Reads a cohort written by `progression.synthetic.make_cohort` (ground_truth.tsv and the
sessions tables); `experiments.make_cohort` prints both tables.
"""

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from progression.disease_model import DIAGNOSES, RATE_REGIONS


def subject_rates(ground_truth: pd.DataFrame, region: str) -> pd.Series:
  """Per subject, the measured compound annual % change of `region` (log-linear LS fit).

  100 (exp(sum t log(V_t / V_0) / sum t^2) - 1) over the follow-ups t (years) of each subject,
  from the `<region>_ml` column; NaN for subjects with one visit.
  """
  def rate(group):
    group = group.sort_values('years_from_first')
    t = group.years_from_first.to_numpy()[1:] - group.years_from_first.iloc[0]
    v = group[f'{region}_ml'].to_numpy()
    if len(t) == 0 or v[0] <= 0:
      return float('nan')
    return 100.0 * math.expm1(float(t @ np.log(np.maximum(v[1:], 1e-9) / v[0]) / (t @ t)))
  return ground_truth.groupby('subject').apply(rate, include_groups=False)


def summarize_cohort(root: str | os.PathLike) -> pd.DataFrame:
  """Per baseline diagnosis: subjects, and mean measured vs target annual % change.

  Columns: subjects, then `<region>_measured` and `<region>_target` (% per year, signed) for
  each of `RATE_REGIONS`. Reads ground_truth.tsv and the sessions tables directly.
  """
  root = Path(root)
  truth = pd.read_csv(root / 'ground_truth.tsv', sep='\t')
  diagnosis = {s: pd.read_csv(root / s / f'{s}_sessions.tsv', sep='\t').diagnosis.iloc[0]
               for s in truth.subject.unique()}
  table = pd.DataFrame({'diagnosis': pd.Series(diagnosis)})
  for region in RATE_REGIONS:
    table[f'{region}_measured'] = subject_rates(truth, region)
    table[f'{region}_target'] = truth.groupby('subject')[f'{region}_annual_rate_pct'].first()
  summary = table.groupby('diagnosis').mean()
  summary.insert(0, 'subjects', table.groupby('diagnosis').size())
  return summary.reindex([d for d in DIAGNOSES if d in summary.index])


SIGNAL_COLUMNS = ('hippocampus_fraction', 'lateral_ventricles_fraction', 'mmse',
                  'hippocampus_rate')


def baseline_signal(root: str | os.PathLike) -> pd.DataFrame:
  """Per subject: diagnosis, stage and what a forecaster can read of it at baseline.

  Columns: diagnosis, stage, hippocampus_fraction and lateral_ventricles_fraction (baseline
  volume / intracranial volume, both from the label map), mmse (baseline) and
  hippocampus_rate (the true annual %, signed).
  """
  root = Path(root)
  truth = pd.read_csv(root / 'ground_truth.tsv', sep='\t')
  first = truth.sort_values('years_from_first').groupby('subject').first()
  sessions = {s: pd.read_csv(root / s / f'{s}_sessions.tsv', sep='\t').iloc[0]
              for s in first.index}
  return pd.DataFrame({
      'diagnosis': [sessions[s].diagnosis for s in first.index],
      'stage': first['stage'],
      'hippocampus_fraction': first['hippocampus_ml'] / first['intracranial_ml'],
      'lateral_ventricles_fraction': first['lateral_ventricles_ml'] / first['intracranial_ml'],
      'mmse': [float(sessions[s].MMSE) for s in first.index],
      'hippocampus_rate': first['hippocampus_annual_rate_pct']}, index=first.index)


def signal_statistics(signal: pd.DataFrame) -> pd.DataFrame:
  """Per diagnosis (and 'all'): subjects and Pearson r of the stage with each `SIGNAL_COLUMNS`.

  `signal` is a `baseline_signal` table. A |r| near 1 means the cohort holds that much signal:
  a forecaster reading that baseline quantity can rank subjects by their future atrophy.
  """
  groups = [(d, signal[signal.diagnosis == d]) for d in DIAGNOSES if (signal.diagnosis == d).any()]
  rows = []
  for name, group in groups + [('all', signal)]:
    row = {'diagnosis': name, 'subjects': len(group)}
    row.update({f'r(stage, {c})': float(group['stage'].corr(group[c])) if len(group) > 2
                else math.nan for c in SIGNAL_COLUMNS})
    rows.append(row)
  return pd.DataFrame(rows).set_index('diagnosis')
