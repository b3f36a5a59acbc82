"""Writes the simulated longitudinal cohort (progression.synthetic) and prints its summary.

  python -m experiments.make_cohort --out /tmp/cohort --subjects 100 --shape 64,64,64 \
      --voxel_mm 2 --visits 3 --seed 0 [--interval_years 1.0] [--workers N]

`--voxel-mm` is accepted as an alias of `--voxel_mm`. Intentionally short: the logic lives in
`progression.synthetic.make_cohort`, which a notebook can call the same way.
"""

import time

import pandas as pd
from absl import app, flags, logging

from experiments import common
from progression import cohort_statistics, synthetic
from progression.errors import ProgressionError

_OUT = flags.DEFINE_string('out', None, 'Cohort folder to create (absent or empty).')
_SUBJECTS = flags.DEFINE_integer('subjects', 100, 'Number of subjects.')
_SHAPE = flags.DEFINE_list('shape', ['64', '64', '64'], 'Grid D,H,W in voxels.')
_VOXEL_MM = flags.DEFINE_float('voxel_mm', 2.0, 'Isotropic voxel size (mm).')
flags.DEFINE_alias('voxel-mm', 'voxel_mm')
_VISITS = flags.DEFINE_integer('visits', 3, 'Visits per subject (baseline included).')
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed (>= 0); same seed, same files.')
_INTERVAL = flags.DEFINE_float('interval_years', 1.0, 'Years between visits.')
_WORKERS = flags.DEFINE_integer('workers', None, 'Worker processes (default: CPUs, max 8).')
_MOTION = flags.DEFINE_float('motion_mm', 0.0, 'Rigid head motion between visits: up to this '
                             'many mm and degrees (0: none).')
flags.mark_flag_as_required('out')


def _shape(values: list[str]) -> tuple[int, int, int]:
  try:
    shape = tuple(int(v) for v in values)
  except ValueError:
    shape = ()
  if len(shape) != 3:
    raise ProgressionError(f'--shape={",".join(values)}: expected three integers D,H,W')
  return shape


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  start = time.monotonic()
  step = max(1, _SUBJECTS.value // 10)

  def progress(done: int, total: int) -> None:
    if done % step == 0 or done == total:
      logging.info('%d/%d subjects (%.1f s)', done, total, time.monotonic() - start)

  root = synthetic.make_cohort(
      _OUT.value, _SUBJECTS.value, shape=_shape(_SHAPE.value), voxel_mm=_VOXEL_MM.value,
      n_visits=_VISITS.value, seed=_SEED.value, visit_interval_years=_INTERVAL.value,
      progress=progress, workers=_WORKERS.value, motion_mm=_MOTION.value)
  logging.info('cohort ready in %.1f s', time.monotonic() - start)
  summary = cohort_statistics.summarize_cohort(root)
  table = pd.DataFrame({'subjects': summary.subjects})
  for region in ('hippocampus', 'lateral_ventricles', 'whole_brain'):
    table[f'{region} %/y measured'] = summary[f'{region}_measured'].round(2)
    table[f'{region} %/y target'] = summary[f'{region}_target'].round(2)
  print(f'cohort: {root}')
  print('mean annual volume change by baseline diagnosis (measured on the label maps vs the '
        'true per-subject rates):')
  print(table.T.to_string())
  print('signal at baseline: correlation of the latent disease stage with what a forecaster '
        'sees (fractions of the intracranial volume) and with the future hippocampal rate:')
  print(cohort_statistics.signal_statistics(cohort_statistics.baseline_signal(root)).round(2).to_string())


if __name__ == '__main__':
  common.run(main)
