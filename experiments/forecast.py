r"""Forecasts one subject's follow-up MRIs with a trained checkpoint and writes them as files.

  python -m experiments.forecast --checkpoint=demo_workdir --baseline=T1.nii.gz \
      [--labels=dseg.nii.gz] --age=73.2 --sex=F --diagnosis=MCI \
      [--mmse=27 --apoe4=1 --cdrsb=1.5 --education=16] --years=1,2,3 --out=forecast/

Writes into --out, for each horizon t (named 1y, 1.5y, ...):
  <stem>_forecast-<t>_T1w.nii.gz       predicted follow-up, on the baseline's grid and affine
  <stem>_forecast-<t>_jacobian.nii.gz  local volume ratio follow-up / baseline (< 1: shrinkage)
  <stem>_forecast-<t>_dseg.nii.gz      baseline labels carried forward (with --labels)
and volumes.csv: one row per horizon x region (years, region, volume_ml, baseline_volume_ml,
change_pct, method), from the labels when given, else from CSF/GM/WM tissue classes.
<stem> is the baseline's file name without extension and BIDS '_T1w'.

Outputs appear complete or not at all: they are written into a hidden staging folder beside
--out and renamed into place, volumes.csv last (a killed run leaves at most that hidden
`.<out>.tmp-*` folder, safe to delete). Existing outputs are kept unless --overwrite.
Covariates: --age in years, --sex F/M, --diagnosis CN/MCI/AD (NA marks a value as unknown).
The logic lives in progression.forecast (Forecaster) and progression.forecast_io (files).
"""

from typing import Sequence

from absl import app, flags, logging

from experiments import common
from progression import covariates, forecast, forecast_io, io
from progression.errors import ProgressionError

_CHECKPOINT = flags.DEFINE_string('checkpoint', None,
                                  'Training workdir (or its checkpoints/ folder).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_BASELINE = flags.DEFINE_string('baseline', None, 'Baseline T1w NIfTI (3D, any orientation).')
_LABELS = flags.DEFINE_string('labels', None,
                              'Baseline label map (FreeSurfer ids) on the baseline\'s grid.')
_YEARS = flags.DEFINE_list('years', ['1', '2', '3'], 'Horizons in years, e.g. 1,1.5,3.')
_OUT = flags.DEFINE_string('out', None, 'Output folder (created if absent).')
_OVERWRITE = flags.DEFINE_boolean('overwrite', False, 'Replace existing outputs.')
# Covariate flag -> field of `covariates.FIELDS`; values are validated by parse_covariates.
_COVARIATE_FLAGS = {
    'age': ('age_years', 'Age at the baseline scan (years).'),
    'sex': ('sex', 'F or M.'),
    'diagnosis': ('diagnosis', 'CN, MCI or AD (Dementia accepted).'),
    'mmse': ('mmse', 'MMSE score (0-30 points).'),
    'cdrsb': ('cdrsb', 'CDR sum of boxes (0-18 points).'),
    'apoe4': ('apoe4', 'Number of APOE e4 alleles (0, 1 or 2).'),
    'education': ('education_years', 'Years of education.'),
}
_REQUIRED = ('checkpoint', 'baseline', 'out', 'age', 'sex', 'diagnosis')
for _flag, (_, _help) in _COVARIATE_FLAGS.items():
  flags.DEFINE_string(_flag, None, _help + (' Required;' if _flag in _REQUIRED else '')
                      + ' NA or empty: unknown.')


def covariates_from_flags(values: dict[str, str | None]) -> covariates.Covariates:
  """Flag name -> raw value (None: not given) -> validated Covariates; errors name the flag."""
  raw = {}
  for flag, (field, _) in _COVARIATE_FLAGS.items():
    value = values.get(flag)
    if value is not None:
      covariates.parse_covariates({field: value}, where=f'--{flag}={value}')
      raw[field] = value
  return covariates.parse_covariates(raw, where='covariate flags')


def years_from_flag(values: Sequence[str]) -> list[float]:
  """['1', '1.5'] -> [1.0, 1.5], validated (`forecast.check_years`)."""
  try:
    years = [float(v) for v in values]
  except ValueError:
    raise ProgressionError(f'--years={",".join(values)}: expected numbers of years, '
                           'e.g. --years=1,2,3') from None
  return forecast.check_years(years)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  missing = [f'--{name}' for name in _REQUIRED if flags.FLAGS[name].value is None]
  if missing:
    raise ProgressionError(f'missing required flag(s) {", ".join(missing)} (see --help)')
  cov = covariates_from_flags({name: flags.FLAGS[name].value for name in _COVARIATE_FLAGS})
  years = years_from_flag(_YEARS.value)
  stem = forecast_io.output_stem(_BASELINE.value)
  paths = forecast_io.output_paths(_OUT.value, stem, years, bool(_LABELS.value))
  forecast_io.check_outputs_free(paths, _OVERWRITE.value)
  baseline = io.load_image(_BASELINE.value)
  labels = io.load_labels(_LABELS.value) if _LABELS.value else None
  common.log_devices()
  forecaster = forecast.Forecaster.from_checkpoint(_CHECKPOINT.value, step=_STEP.value)
  trajectory = forecaster.forecast(baseline, cov, years, labels=labels)
  written = forecast_io.save_forecasts(trajectory, _OUT.value, stem,
                                       overwrite=_OVERWRITE.value)
  logging.info('wrote %d files into %s', len(written), _OUT.value)
  print(forecast.volumes_table(trajectory).to_string(index=False, float_format='%.3f'))


if __name__ == '__main__':
  common.run(main)
