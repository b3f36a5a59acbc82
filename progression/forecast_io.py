"""Forecasts on disk: file names and an all-or-nothing save of a trajectory.

For a baseline `<stem>_T1w.nii.gz` and each horizon t (named by `horizon_name`: 1y, 1.5y):
  <stem>_forecast-<t>_T1w.nii.gz       predicted follow-up, on the baseline's grid and affine
  <stem>_forecast-<t>_jacobian.nii.gz  local volume ratio follow-up / baseline (< 1: shrinkage)
  <stem>_forecast-<t>_dseg.nii.gz      baseline labels carried forward (when given; int16)
and volumes.csv (`forecast.volumes_table`: years, region, volume_ml, baseline_volume_ml,
change_pct, method), written last. Used by `experiments/forecast.py`.
"""

import functools
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from progression import forecast, io
from progression.errors import ProgressionError

VOLUMES_CSV = 'volumes.csv'


def horizon_name(years: float) -> str:
  """File-name tag of a horizon: 1 -> '1y', 1.5 -> '1.5y', 0.25 -> '0.25y' (exact)."""
  return np.format_float_positional(float(years), trim='-') + 'y'


def output_stem(baseline_path: str | Path) -> str:
  """'sub-01_ses-M000_T1w.nii.gz' -> 'sub-01_ses-M000' (extension and BIDS '_T1w' dropped)."""
  name = Path(baseline_path).name
  for suffix in ('.nii.gz', '.nii'):
    name = name[:-len(suffix)] if name.endswith(suffix) else name
  return name[:-len('_T1w')] if name.endswith('_T1w') and len(name) > 4 else name


def output_paths(out_dir: str | Path, stem: str, years: Sequence[float],
                 with_labels: bool) -> list[Path]:
  """Every file `save_forecasts` writes, volumes.csv last."""
  names = [horizon_name(t) for t in forecast.check_years(years)]
  if len(set(names)) != len(names):
    raise ProgressionError(f'years: duplicate horizons in {[float(t) for t in years]}')
  kinds = ('T1w', 'jacobian', 'dseg') if with_labels else ('T1w', 'jacobian')
  out = Path(out_dir)
  return [out / f'{stem}_forecast-{n}_{k}.nii.gz' for n in names for k in kinds] + [
      out / VOLUMES_CSV]


def check_outputs_free(paths: Sequence[Path], overwrite: bool) -> None:
  """Raises ProgressionError when one of `paths` exists (unless `overwrite`)."""
  existing = [p for p in paths if p.exists()]
  if existing and not overwrite:
    raise ProgressionError(f'{existing[0]}: output exists ({len(existing)} of '
                           f'{len(paths)} outputs do); choose another output folder or overwrite '
                           '(--overwrite)')


def save_forecasts(forecasts: Sequence[forecast.Forecast], out_dir: str | Path, stem: str,
                   overwrite: bool = False) -> list[Path]:
  """Writes a trajectory's NIfTIs and volumes.csv (names: `output_paths`), all or nothing.

  Through `io.write_folder`: staged in a hidden folder beside `out_dir`, volumes.csv moved
  in last, so a crash or kill -9 leaves only complete files, and volumes.csv only beside a
  complete set.

  Raises:
    ProgressionError: when an output exists and not `overwrite`, or on OS errors.
  """
  if not forecasts:
    raise ProgressionError('save_forecasts: no forecasts to save')
  paths = output_paths(out_dir, stem, [f.years for f in forecasts],
                       forecasts[0].labels is not None)
  check_outputs_free(paths, overwrite)
  images = [image for f in forecasts
            for image in (f.image, f.jacobian) + ((f.labels,) if f.labels is not None else ())]
  writers = {path.name: functools.partial(nib.save, image)
             for path, image in zip(paths[:-1], images)}
  table = forecast.volumes_table(forecasts)
  writers[VOLUMES_CSV] = lambda path: table.to_csv(path, index=False, float_format='%.6f')
  return io.write_folder(out_dir, writers)
