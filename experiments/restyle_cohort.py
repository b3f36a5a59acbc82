"""Copies a synthetic cohort stored the way real cohorts come (issue: real cohorts' DoD run).

  python -m experiments.make_cohort --out /tmp/moved --subjects 60 --shape 64,64,64 \
      --voxel_mm 3 --motion_mm 3 --seed 5
  python -m experiments.restyle_cohort --source /tmp/moved --out /tmp/moved_real \
      [--las_share 0.5] [--noparcellate] [--header_motion_mm 3 --seed 0]

The copy stores `--las_share` of the subjects LAS and splits every label map's cortex into
aparc+aseg-style parcels (`progression.synthetic_restyle`); the phantom's heads already have
skull and scalp. `--header_motion_mm` moves each follow-up head by a rigid transform written
into its affines only (the same voxels: what registration and resampling alone change). Train
on it with the `synthetic_moved` spec when it was made with `--motion_mm` or
`--header_motion_mm` (registration on), else with `synthetic`.
"""

from absl import app, flags

from experiments import common
from progression import synthetic_restyle

_SOURCE = flags.DEFINE_string('source', None, 'Cohort folder written by make_cohort.')
_OUT = flags.DEFINE_string('out', None, 'Folder to create (absent or empty).')
_LAS_SHARE = flags.DEFINE_float('las_share', 0.5, 'Share of subjects stored LAS.')
_PARCELLATE = flags.DEFINE_bool('parcellate', True, 'Split the cortex into parcels.')
_HEADER_MOTION_MM = flags.DEFINE_float(
    'header_motion_mm', 0.0, 'Rigid motion of each follow-up written into its affines only '
    '(rotations in degrees and translations in mm, uniform in +-this); 0: none.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seeds the header motion.')
flags.mark_flags_as_required(['source', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  out = synthetic_restyle.restyle_cohort(_SOURCE.value, _OUT.value, _LAS_SHARE.value,
                                         _PARCELLATE.value, _HEADER_MOTION_MM.value, _SEED.value)
  print(f'wrote {out}')


if __name__ == '__main__':
  common.run(main)
