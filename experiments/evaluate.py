"""Evaluates a trained generator against real follow-ups, beside the no-change and
population-rate baselines.

  python -m experiments.evaluate --workdir=/tmp/w --cohort=synthetic \
      --cohort_root=/data/cohort --split=test --out=/tmp/report [--overwrite]

`--checkpoint=DIR` (a `checkpoints/` folder) may replace `--workdir`; `--cohort` and
`--cohort_root` default to the checkpoint's. The training split is reproduced from the
checkpoint's config (cohort.split_fractions, cohort.split_seed); the population-rate
baseline is fitted on its train split. Writes pairs.csv, summary.csv, report.html and
report.md (see progression.evaluation.report) plus population_rates.json into --out.
The logic is `evaluate_checkpoint`, which a notebook can call the same way.
"""

import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import ml_collections
import numpy as np
import pandas as pd
from absl import app, flags, logging

from experiments import common
from progression import checkpoints, cohort, forecast, io, train
from progression.errors import ProgressionError
from progression.evaluation import baselines, figures, report

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir holding checkpoints/.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'A checkpoints/ folder (instead of '
                                  '--workdir).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_COHORT = flags.DEFINE_string('cohort', None, 'Cohort spec name or .toml path (default: the '
                              "checkpoint's).")
_COHORT_ROOT = flags.DEFINE_string('cohort_root', None, "Cohort folder (default: the "
                                   "checkpoint's).")
_SPLIT = flags.DEFINE_enum('split', 'test', cohort.SPLITS, 'Which split to evaluate.')
_OUT = flags.DEFINE_string('out', None, 'Report folder (absent or empty unless --overwrite).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace the report in a non-empty --out.')
_EXAMPLES = flags.DEFINE_integer('examples', 2, 'Pairs shown as example slices.')
flags.mark_flag_as_required('out')


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
                                volume_method=result.volume_method)


class ProgressBar:
  """`progress(done, total)` drawing '[####....] done/total what 12s ETA 30s' on stderr.

  Redraws in place on a terminal; elsewhere (logs, pipes) prints a line per tenth of the work.
  """

  def __init__(self, what: str, stream: TextIO | None = None, width: int = 30):
    self._what, self._stream, self._width = what, stream or sys.stderr, width
    self._start = time.monotonic()
    self._tty = self._stream.isatty()
    self._last_tenth = -1

  def __call__(self, done: int, total: int) -> None:
    tenth = (10 * done) // max(total, 1)
    if not self._tty and tenth == self._last_tenth and done != total:
      return
    self._last_tenth = tenth
    elapsed = time.monotonic() - self._start
    eta = f' ETA {elapsed / done * (total - done):.0f}s' if 0 < done < total else ''
    filled = (self._width * done) // max(total, 1)
    line = (f'[{"#" * filled}{"." * (self._width - filled)}] {done}/{total} {self._what} '
            f'{elapsed:.0f}s{eta}')
    end = '\n' if (done == total or not self._tty) else ''
    self._stream.write(('\r' if self._tty else '') + line + end)
    self._stream.flush()


class Outputs(NamedTuple):
  files: dict[str, Path]  # File name -> path.
  headline: pd.DataFrame  # `report.headline_table`.


def checkpoint_config(checkpoint: str | Path, step: int | None = None
                      ) -> tuple[ml_collections.ConfigDict, dict]:
  """The experiment config and metadata saved with a checkpoint (workdir or checkpoints/)."""
  path = Path(checkpoint)
  folder = path / checkpoints.CHECKPOINT_SUBDIR
  previous = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # orbax logs every step of opening a checkpoint.
  try:
    checkpointer = checkpoints.Checkpointer(folder if folder.is_dir() else path, read_only=True)
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
                        num_examples: int = 2) -> Outputs:
  """Evaluates the model of `checkpoint` and both baselines on `split`; writes the report.

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
  report.check_pairs(pairs, where)
  volume_method = baselines.volume_method_of(pd.concat([data.train, pairs]))
  rates = baselines.fit_population_rates(
      baselines.training_volume_table(data.train, volume_method,
                                      ProgressBar('training pairs measured')), volume_method)
  model = ForecasterMethod(forecast.Forecaster.from_checkpoint(checkpoint, step), volume_method)
  methods = [model, baselines.PopulationRateBaseline(rates),
             baselines.NoChangeBaseline(volume_method)]
  evaluation = report.evaluate_pairs(pairs, methods, volume_method, num_examples,
                                     ProgressBar(f'{split} pairs evaluated'), where)
  summary = report.summarize(evaluation.rows)
  context = {'checkpoint': Path(checkpoint).absolute(), 'step': metadata.get('step'),
             'cohort': f'{config.cohort.spec} at {config.cohort.root}', 'split': split,
             'pairs': len(pairs), 'subjects': pairs['subject'].nunique(),
             'volumes from': volume_method, 'methods': ', '.join(m.name for m in methods)}
  files = report.write_report(
      out, evaluation, summary, context, overwrite=overwrite,
      extra_json={'population_rates.json': rates.to_dict()},
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if (_WORKDIR.value is None) == (_CHECKPOINT.value is None):
    raise ProgressionError('give exactly one of --workdir or --checkpoint')
  common.log_devices()
  outputs = evaluate_checkpoint(
      _WORKDIR.value or _CHECKPOINT.value, _OUT.value, split=_SPLIT.value,
      cohort_spec=_COHORT.value, cohort_root=_COHORT_ROOT.value, overwrite=_OVERWRITE.value,
      step=_STEP.value, num_examples=_EXAMPLES.value)
  print(f'report: {outputs.files["report.html"].absolute()}')
  print(figures.markdown_table(outputs.headline))


if __name__ == '__main__':
  common.run(main)
