"""Reference rows for synthetic cohorts, whose true rates are known: `oracle` and `expected`.

They are references, not competitors: `oracle` applies each subject's true annual rates
(`<region>_annual_rate_pct` of the cohort's ground_truth.tsv) to its measured baseline
volumes, so its error is what label-map measurement alone leaves; `expected` applies the rate
expected from what is observable at baseline (`<region>_expected_rate_pct`,
`progression.disease_model.expected_rates`): the best any forecaster can do on average.
Regions without a ground-truth rate are predicted as NaN (left out of the summaries).
"""

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from progression import io
from progression.errors import ProgressionError
from progression.evaluation import baselines

GROUND_TRUTH = 'ground_truth.tsv'
COLUMN_SUFFIX = {'oracle': '_annual_rate_pct', 'expected': '_expected_rate_pct'}


class RateReference:
  """Applies per-subject rates (compound %/year) from a ground-truth table."""

  def __init__(self, name: str, rates: Mapping[str, Mapping[str, float]]):
    self.name = name
    self.rates = rates  # subject -> region -> %/year

  def predict(self, pair_row: Mapping[str, Any], baseline: io.Volume,
              baseline_labels: io.Volume | None) -> baselines.Prediction:
    baseline_ml = baselines.measure_volumes_ml(baseline, baseline_labels, 'labels')
    subject = str(pair_row['subject'])
    if subject not in self.rates:
      raise ProgressionError(f'{GROUND_TRUTH}: no rates for subject {subject}')
    years = float(pair_row['interval_years'])
    rates = self.rates[subject]
    volumes = {r: (v * (1.0 + rates[r] / 100.0) ** years if r in rates else math.nan)
               for r, v in baseline_ml.items()}
    return baselines.Prediction(image=baseline.data, volumes_ml=volumes, volume_method='labels')


def reference_methods(cohort_root: str | Path, volume_method: str) -> list[RateReference]:
  """`oracle` and `expected` when the cohort has a ground-truth table with both rates.

  Empty for cohorts without one (real cohorts) or without label maps.
  """
  path = Path(cohort_root) / GROUND_TRUTH
  if volume_method != 'labels' or not path.is_file():
    return []
  try:
    truth = pd.read_csv(path, sep='\t')
  except (OSError, ValueError) as e:
    raise ProgressionError(f'{path}: cannot read the ground-truth table: {e}') from None
  methods = []
  for name, suffix in COLUMN_SUFFIX.items():
    columns = [c for c in truth.columns if c.endswith(suffix)]
    if not columns or 'subject' not in truth.columns:
      continue
    first = truth.groupby('subject')[columns].first()
    rates = {str(s): {c[:-len(suffix)]: float(v) for c, v in row.items()}
             for s, row in first.iterrows()}
    methods.append(RateReference(name, rates))
  return methods
