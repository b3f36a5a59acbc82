"""Checks of an evaluation's pairs before any computation: files, grids, registration.

`check_pairs` reads NIfTI headers only (unless the cohort spec registers follow-ups to their
baselines), so a bad table fails in seconds, naming the pair and the file.
"""

from pathlib import Path
from typing import Any, Mapping

import nibabel as nib
import numpy as np
import pandas as pd

from progression import cohort_spec, registration
from progression.errors import ProgressionError
from progression.evaluation.baselines import optional_text
from progression.progress import ProgressBar

# Pairs column set by `check_pairs` with registration: the follow-up's 4x4 fixed_to_moving.
REGISTRATION_COLUMN = 'registration_fixed_to_moving'
_AFFINE_TOLERANCE_MM = 1e-3


def check_pairs(pairs: pd.DataFrame, where: str = 'pairs',
                registration_spec: cohort_spec.RegistrationSpec | None = None,
                registration_cache_dir: str | Path | None = None) -> pd.DataFrame:
  """Fails fast, before any computation, on an empty table, missing files or grid mismatch.

  Reads NIfTI headers only, unless registering. The baseline label map must lie on the
  baseline's voxel grid: same canonical RAS+ shape and affine (within 1e-3 mm), as
  predictions are made on the baseline grid. Without registration (`registration_spec` None
  or disabled) so must the follow-up image and label map. With it, each follow-up is rigidly
  registered to its baseline (`registration.register_pairs`, cached in
  `registration_cache_dir`, default `registration.default_cache_dir()`), and `_load` resamples
  it onto the baseline grid; pairs failing the alignment check are refused or left out, as
  `registration_spec.on_failure` says.

  Returns:
    the pairs to evaluate: `pairs`, or with registration the kept pairs with the column
    `REGISTRATION_COLUMN` (4x4 fixed_to_moving, world mm).

  Raises:
    ProgressionError: naming the pair and file.
  """
  if len(pairs) == 0:
    raise ProgressionError(f'{where}: no pairs to evaluate (the split is empty)')
  registering = registration_spec is not None and registration_spec.enabled
  for row in pairs.to_dict('records'):
    name = pair_name(row)
    reference = _header_grid(row['baseline_image'], f'{name}: baseline image')
    for column, what in (('followup_image', 'follow-up image'),
                         ('baseline_labels', 'baseline label map'),
                         ('followup_labels', 'follow-up label map')):
      path = optional_text(row.get(column))
      if path is None:
        continue
      shape, affine = _header_grid(path, f'{name}: {what}')
      if registering and column != 'baseline_labels':
        continue  # Registered and resampled onto the baseline grid by `_load`.
      if shape != reference[0] or not np.allclose(affine, reference[1],
                                                  atol=_AFFINE_TOLERANCE_MM):
        raise ProgressionError(
            f'{name}: {what} {path} is on another voxel grid (shape {shape}, affine '
            f'{np.round(affine, 3).tolist()}) than the baseline {row["baseline_image"]} (shape '
            f'{reference[0]}, affine {np.round(reference[1], 3).tolist()}); resample or '
            'register it onto the baseline grid first (or enable [registration] in the cohort '
            'spec)')
  if not registering:
    return pairs
  kept, registrations = registration.register_pairs(
      pairs, registration_cache_dir or registration.default_cache_dir(),
      registration_spec.on_failure, ProgressBar('pairs registered (follow-up to baseline)'))
  if len(kept) == 0:
    raise ProgressionError(f'{where}: no pairs to evaluate: every pair failed registration')
  return kept.assign(**{REGISTRATION_COLUMN: [r.transform.fixed_to_moving
                                              for r in registrations]})


def pair_name(row: Mapping[str, Any]) -> str:
  return f'subject {row["subject"]} {row["baseline_session"]} -> {row["followup_session"]}'


def _header_grid(path: Any, what: str) -> tuple[tuple[int, ...], np.ndarray]:
  """Canonical (RAS+) shape and affine from a NIfTI header, without reading voxels."""
  if optional_text(path) is None or not Path(path).is_file():
    raise ProgressionError(f'{what} not found: {path}')
  try:
    image = nib.load(str(path))  # Header only; the voxels are not read.
    affine, shape = np.asarray(image.affine, np.float64), tuple(int(s) for s in image.shape)
  except Exception as e:  # nibabel raises many types for damaged files.
    raise ProgressionError(f'{what} {path}: cannot read the NIfTI header: {e}') from None
  shape = shape[:3]
  ornt = nib.orientations.io_orientation(affine)
  canon_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
  canon_shape = tuple(shape[int(axis)] for axis in np.argsort(ornt[:, 0]))
  return canon_shape, canon_affine
