"""Evaluation of a checkpoint end to end: split -> methods -> per-pair rows -> report files.

`evaluate_checkpoint` is what `python -m experiments.evaluate` runs, and what the demo and
notebooks call directly. The model enters only through `Forecaster` (as `ForecasterMethod`),
so the report code does not depend on training internals.
"""

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import ml_collections
import numpy as np
import pandas as pd
from absl import logging

from progression import checkpoints, cohort, forecast, io, regional_intervals, train
from progression.progress import ProgressBar
from progression.errors import ProgressionError
from progression.evaluation import baselines, references, report, visit_volumes


class ForecasterMethod:
  """The trained generator as an evaluation method (`baselines.Method`) named 'model'."""
  name = 'model'

  def __init__(self, forecaster: forecast.Forecaster, volume_method: str):
    self.forecaster = forecaster
    self.volume_method = volume_method

  def predict(self, pair_row: Mapping[str, Any], baseline: io.Volume,
              baseline_labels: io.Volume | None) -> baselines.Prediction:
    labels = baseline_labels if self.volume_method == 'labels' else None
    [result] = self.forecaster.forecast(baseline, cohort.covariates_of(pair_row),
                                        years=[float(pair_row['interval_years'])], labels=labels)
    image = io.from_array(np.asarray(result.image.dataobj, dtype=np.float32),
                          result.image.affine).data
    return baselines.Prediction(image=image, volumes_ml=result.volumes_ml,
                                volume_method=result.volume_method,
                                intervals_ml=result.intervals_ml)


class Outputs(NamedTuple):
  files: dict[str, Path]  # File name -> path.
  headline: pd.DataFrame  # `report.headline_table`.


def checkpoint_config(checkpoint: str | Path, step: int | None = None
                      ) -> tuple[ml_collections.ConfigDict, dict]:
  """The experiment config and metadata saved with a checkpoint (workdir or checkpoints/)."""
  path = Path(checkpoint)
  previous = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # orbax logs every step of opening a checkpoint.
  try:
    checkpointer = checkpoints.Checkpointer(checkpoints.folder_of(path), read_only=True)
    try:
      metadata = checkpointer.restore_metadata(step)
    finally:
      checkpointer.close()
  finally:
    logging.set_verbosity(previous)
  if 'config' not in metadata:
    raise ProgressionError(f'{path}: checkpoint metadata has no config; not a progression '
                           'training checkpoint?')
  return ml_collections.ConfigDict(metadata['config']), metadata


def evaluate_checkpoint(checkpoint: str | Path, out: str | Path, split: str = 'test',
                        cohort_spec: str | None = None, cohort_root: str | Path | None = None,
                        overwrite: bool = False, step: int | None = None,
                        num_examples: int = 2, volume_method: str | None = None) -> Outputs:
  """Evaluates the model of `checkpoint` and both baselines on `split`; writes the report.

  `volume_method`: 'labels', 'tissue' or None (labels when every pair has label maps).
  'tissue' on a labelled cohort evaluates what a user with T1w images alone gets: every
  method forecasts and is measured on the tissue model's brain, GM, WM and CSF, the model
  without the baseline label map (its tissue-model fallback), the regional model row with
  the checkpoint's tissue-volume regional model.

  Raises:
    ProgressionError: non-empty `out` without `overwrite`, unknown split, empty split,
      missing follow-up images, follow-ups off the baseline grid, bad checkpoint or cohort.
  """
  report.check_output_dir(out, overwrite)
  if split not in cohort.SPLITS:
    raise ProgressionError(f'split must be one of {cohort.SPLITS}, got {split!r}')
  config, metadata = checkpoint_config(checkpoint, step)
  if cohort_spec:
    config.cohort.spec = str(cohort_spec)
  if cohort_root:
    config.cohort.root = str(Path(cohort_root).absolute())
  data = train.load_experiment_data(config)
  pairs = getattr(data, split)
  where = f'split {split!r} of cohort {config.cohort.spec!r} at {config.cohort.root}'
  pairs = report.check_pairs(pairs, where, data.registration)
  available = baselines.volume_method_of(pd.concat([data.train, pairs]))
  if volume_method is None:
    volume_method = available
  elif volume_method not in baselines.VOLUME_METHODS or (volume_method == 'labels'
                                                        and available != 'labels'):
    raise ProgressionError(f'{where}: volume method {volume_method!r} is not available (one '
                           f'of {baselines.VOLUME_METHODS}; labels need every pair\'s maps)')
  known = visit_volumes.VisitVolumes(visit_volumes.file_in(checkpoints.workdir_of(checkpoint)),
                                     writable=False)  # What training measured, read only.
  rates = baselines.fit_population_rates(
      baselines.training_volume_table(data.train, volume_method,
                                      ProgressBar('training pairs measured'), known),
      volume_method)
  forecaster = forecast.Forecaster.from_checkpoint(checkpoint, step)
  regional = next((m for m in (forecaster.regional, forecaster.tissue_regional)
                   if m is not None and m.volume_method == volume_method), None)
  if regional is None:
    regional = regional_intervals.fit_on_pairs(data.train, data.val, volume_method,
                                               seed=config.seed, known=known)
  methods = [ForecasterMethod(forecaster, volume_method),
             baselines.RegionalModelBaseline(regional),
             baselines.PopulationRateBaseline(rates),
             baselines.NoChangeBaseline(volume_method),
             *references.reference_methods(config.cohort.root, volume_method)]
  evaluation = report.evaluate_pairs(pairs, methods, volume_method, num_examples,
                                     ProgressBar(f'{split} pairs evaluated'), where,
                                     registration_spec=data.registration)
  summary = report.summarize(evaluation.rows)
  context = {'checkpoint': Path(checkpoint).absolute(), 'step': metadata.get('step'),
             'cohort': f'{config.cohort.spec} at {config.cohort.root}', 'split': split,
             'pairs': len(pairs), 'subjects': pairs['subject'].nunique(),
             'volumes from': volume_method, 'methods': ', '.join(m.name for m in methods)}
  files = report.write_report(
      out, evaluation, summary, context, overwrite=overwrite,
      extra_json={'population_rates.json': rates.to_dict(),
                  'regional_model.json': regional.to_dict()},
      extra_tables={'Population rates (percent/year at the mean training age)':
                    rates_table(rates)})
  return Outputs(files=files, headline=report.headline_table(summary, volume_method))


def rates_table(rates: baselines.PopulationRates) -> pd.DataFrame:
  """Region x diagnosis rates (percent/year) with the age slope, for the HTML report."""
  groups = [baselines.ALL] + sorted({d for by_dx in rates.rates_pct_per_year.values()
                                     for d in by_dx} - {baselines.ALL})
  return pd.DataFrame([{'region': region, **{g: by_dx.get(g, math.nan) for g in groups},
                        'age slope (%/y per year)': rates.age_slope_pct_per_year2[region]}
                       for region, by_dx in rates.rates_pct_per_year.items()])
