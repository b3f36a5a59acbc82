"""The README demo: synthetic cohort -> training -> forecast -> volumetric report.

  python -m experiments.demo --workdir=demo_workdir

Re-running with the same --workdir continues: the cohort is reused, training resumes
from its last checkpoint (or is skipped when finished), and the forecast and report are
rewritten from the latest checkpoint. Layout of the workdir:
  cohort/    the simulated cohort (Clinica BIDS + ground_truth.tsv)
  train/     checkpoints/, metrics.jsonl, tensorboard/
  forecast/  one test subject's forecasts at 1, 2 and 3 years (NIfTI + volumes.csv)
  report/    report.html, report.md, pairs.csv, summary.csv
"""

import time
from pathlib import Path

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import common
from progression import cohort, forecast, forecast_io, synthetic, train
from progression.evaluation import figures, pipeline

_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for the cohort, model and reports.')
_CONFIG = config_flags.DEFINE_config_file(
    'config', str(Path(__file__).parent / 'configs' / 'demo.py'), 'Training configuration.')
_SUBJECTS = flags.DEFINE_integer('subjects', 60, 'Subjects in the synthetic cohort.')
_VISITS = flags.DEFINE_integer('visits', 3, 'Yearly visits per subject.')
_COHORT_SHAPE = flags.DEFINE_list('cohort_shape', ['64', '64', '64'], 'Cohort image voxels.')
_COHORT_VOXEL_MM = flags.DEFINE_float('cohort_voxel_mm', 3.0, 'Cohort voxel size in mm.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the synthetic cohort.')
flags.mark_flags_as_required(['workdir'])

FORECAST_YEARS = (1.0, 2.0, 3.0)


def run_demo(workdir: str | Path, config: ml_collections.ConfigDict, subjects: int,
             visits: int, cohort_shape: tuple[int, int, int], cohort_voxel_mm: float,
             seed: int) -> pipeline.Outputs:
  """Runs (or continues) the four demo stages in `workdir`; returns the report outputs."""
  workdir = Path(workdir).absolute()
  start = time.perf_counter()
  _stage(1, f'synthetic cohort: {subjects} subjects x {visits} visits at {cohort_shape}')
  cohort_root = synthetic.make_cohort(workdir / 'cohort', n_subjects=subjects,
                                      shape=cohort_shape, voxel_mm=cohort_voxel_mm,
                                      n_visits=visits, seed=seed)
  config = ml_collections.ConfigDict(config.to_dict())
  config.cohort.root = str(cohort_root)
  _stage(2, f'training {config.num_steps} steps on a {tuple(config.grid.shape)} grid '
         f'(resumes from {workdir / "train"} when it holds a checkpoint)')
  train.train_and_evaluate(config, workdir / 'train')
  _stage(3, 'forecasting one test subject at ' + ', '.join(f'{t:g}' for t in FORECAST_YEARS)
         + ' years')
  written = forecast_one_test_subject(config, workdir / 'train', workdir / 'forecast')
  print(f'    wrote {len(written)} files to {workdir / "forecast"}')
  _stage(4, 'evaluating the model, the regional model and both baselines on the test split')
  outputs = pipeline.evaluate_checkpoint(workdir / 'train', workdir / 'report',
                                             overwrite=True)
  print(f'\nDone in {time.perf_counter() - start:.0f} s. Report: {outputs.files["report.html"]}')
  print(figures.markdown_table(outputs.headline))
  return outputs


def forecast_one_test_subject(config: ml_collections.ConfigDict, checkpoint: Path,
                              out: Path) -> list[Path]:
  """Forecasts the first test subject's baseline visit; writes NIfTIs and volumes.csv."""
  data = train.load_experiment_data(config)
  pairs = data.test if len(data.test) else data.val
  row = pairs.sort_values(['subject', 'interval_years']).iloc[0]
  forecaster = forecast.Forecaster.from_checkpoint(checkpoint)
  forecasts = forecaster.forecast(row['baseline_image'], cohort.covariates_of(row),
                                  FORECAST_YEARS, labels=row['baseline_labels'])
  print(f'    {row["subject"]} ({row["diagnosis"]}, {row["age_years"]:.1f} y): hippocampus '
        + ', '.join(f'{f.years:g} y {f.volumes_ml["hippocampus"]:.2f} mL' for f in forecasts))
  return forecast_io.save_forecasts(forecasts, out, forecast_io.output_stem(
      row['baseline_image']), overwrite=True)


def _stage(number: int, text: str) -> None:
  print(f'[{number}/4] {text}', flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  shape = tuple(int(s) for s in _COHORT_SHAPE.value)
  run_demo(_WORKDIR.value, _CONFIG.value, _SUBJECTS.value, _VISITS.value, shape,
           _COHORT_VOXEL_MM.value, _SEED.value)


if __name__ == '__main__':
  common.run(main)
