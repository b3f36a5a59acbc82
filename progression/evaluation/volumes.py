"""Regional brain volumes (mL) from label maps and Jacobian determinants, and their change.

Plain numpy functions, one value per call (per subject/visit), usable outside training.
Regions are named groups of FreeSurfer/SynthSeg label ids (`progression.labels.REGIONS`).

Two ways to measure a follow-up volume:
- `regional_volumes_ml(followup_labels, ...)`: count the voxels carrying each region's ids
  (a real or predicted follow-up segmentation);
- `jacobian_integrated_volumes_ml(baseline_labels, jacobian, ...)`: tensor-based morphometry.
  A deformation phi maps the baseline onto the follow-up; the follow-up volume of a baseline
  region R is the integral of det(D phi) over R, i.e. sum over R's voxels of det J times the
  voxel volume. It needs no follow-up segmentation and no label resampling.
"""

from collections.abc import Mapping, Sequence

import numpy as np

from progression import io
from progression import labels as labels_lib
from progression.errors import ProgressionError

RegionMap = Mapping[str, Sequence[int]]


def default_regions(include_inferior_lateral: bool = False) -> dict[str, tuple[int, ...]]:
  """The project's regions (`labels.REGIONS`) as a plain dict.

  Args:
    include_inferior_lateral: when True, 'lateral_ventricles' also counts the inferior lateral
      horns (ids 5/44, `labels.LATERAL_VENTRICLES_WITH_INFERIOR`), as some pipelines report it.
  """
  regions = {name: tuple(ids) for name, ids in labels_lib.REGIONS.items()}
  if include_inferior_lateral:
    regions['lateral_ventricles'] = tuple(labels_lib.LATERAL_VENTRICLES_WITH_INFERIOR)
  return regions


def regional_volumes_ml(labels: np.ndarray, voxel_volume_ml: float,
                        regions: RegionMap | None = None,
                        include_inferior_lateral: bool = False) -> dict[str, float]:
  """Volume of each region in a label map, in mL.

  Args:
    labels: `[x, y, z]` integer label map (FreeSurfer ids).
    voxel_volume_ml: volume of one voxel in mL (1 mL = 1000 mm^3), e.g. `Volume.voxel_volume_ml`.
    regions: region name -> label ids; defaults to `default_regions(include_inferior_lateral)`.
    include_inferior_lateral: see `default_regions` (ignored when `regions` is given).

  Returns:
    region name -> number of voxels with any of its ids times `voxel_volume_ml` (mL).

  Raises:
    ProgressionError: for a non-3D, non-integer or negative label map or a non-positive voxel
      volume.
  """
  labels = _check_labels(labels)
  _check_voxel_volume(voxel_volume_ml)
  regions = _resolve_regions(regions, include_inferior_lateral)
  counts = np.bincount(labels.ravel())
  return {name: float(_sum_ids(counts, ids)) * float(voxel_volume_ml)
          for name, ids in regions.items()}


def jacobian_integrated_volumes_ml(labels: np.ndarray, jacobian: np.ndarray,
                                   voxel_volume_ml: float, regions: RegionMap | None = None,
                                   include_inferior_lateral: bool = False) -> dict[str, float]:
  """Follow-up volume of each baseline region by integrating the Jacobian determinant, in mL.

  Tensor-based morphometry: with phi the baseline -> follow-up deformation and J = det(D phi)
  sampled on the baseline grid, the follow-up volume of baseline region R is
  sum_{v in R} J(v) * voxel_volume_ml. With J == 1 this is `regional_volumes_ml(labels)`; with a
  uniform scaling by s per axis (J == s^3) it is exactly s^3 times the baseline volume.

  Args:
    labels: `[x, y, z]` integer BASELINE label map (FreeSurfer ids).
    jacobian: `[x, y, z]` det J on the same grid (unitless; > 0 for a diffeomorphism).
    voxel_volume_ml: volume of one baseline voxel in mL.
    regions: region name -> label ids; defaults to `default_regions(include_inferior_lateral)`.
    include_inferior_lateral: see `default_regions` (ignored when `regions` is given).

  Returns:
    region name -> integrated follow-up volume (mL).

  Raises:
    ProgressionError: when shapes differ, the label map is not integer, the Jacobian holds
      NaN/inf, or the voxel volume is not positive.
  """
  labels = _check_labels(labels)
  jacobian = np.asarray(jacobian, dtype=np.float64)
  if jacobian.shape != labels.shape:
    raise ProgressionError(
        f'jacobian shape {jacobian.shape} does not match labels shape {labels.shape}')
  if not np.all(np.isfinite(jacobian)):
    raise ProgressionError('jacobian contains NaN or infinite values')
  _check_voxel_volume(voxel_volume_ml)
  regions = _resolve_regions(regions, include_inferior_lateral)
  sums = np.bincount(labels.ravel(), weights=jacobian.ravel())
  return {name: float(_sum_ids(sums, ids)) * float(voxel_volume_ml)
          for name, ids in regions.items()}


def volumes_from_volume(volume: io.Volume, regions: RegionMap | None = None,
                        include_inferior_lateral: bool = False) -> dict[str, float]:
  """`regional_volumes_ml` of a loaded label map (`io.load_labels`), voxel volume from its affine.

  Returns:
    region name -> volume (mL).
  """
  return regional_volumes_ml(volume.data, volume.voxel_volume_ml, regions=regions,
                             include_inferior_lateral=include_inferior_lateral)


def percent_change(v0: float | np.ndarray, v1: float | np.ndarray) -> float | np.ndarray:
  """Total percent change from `v0` to `v1`: 100 * (v1 / v0 - 1) (negative = loss).

  Args:
    v0: baseline volume(s) (any unit, > 0).
    v1: follow-up volume(s), same unit (>= 0).

  Raises:
    ProgressionError: for a non-positive baseline, a negative follow-up or NaN/inf.
  """
  v0, v1 = _check_volumes(v0, v1)
  return _as_output(100.0 * (v1 / v0 - 1.0))


def annualized_percent_change(v0: float | np.ndarray, v1: float | np.ndarray,
                              years: float | np.ndarray) -> float | np.ndarray:
  """Compound annual percent change: 100 * ((v1 / v0) ** (1 / years) - 1).

  The constant yearly rate r (in %) with v1 = v0 * (1 + r/100) ** years, so that a region losing
  2 %/year for 3 years (v1 = v0 * 0.98^3) gives exactly -2.0, not the linear -1.96 (= total
  change / years). Compose-safe: the rate over [0, t1 + t2] of a constant-rate decline equals the
  rate over each sub-interval. For the simple total change see `percent_change`.

  Args:
    v0: baseline volume(s) (any unit, > 0).
    v1: follow-up volume(s), same unit (>= 0).
    years: interval(s) in years (> 0).

  Returns:
    % per year (float for scalar inputs, else an array broadcast over the inputs).

  Raises:
    ProgressionError: for a non-positive baseline or interval, a negative follow-up or NaN/inf.
  """
  v0, v1 = _check_volumes(v0, v1)
  years = np.asarray(years, dtype=np.float64)
  if not np.all(np.isfinite(years)) or np.any(years <= 0):
    raise ProgressionError(f'interval must be positive years, got {years.tolist()}')
  return _as_output(100.0 * (np.power(v1 / v0, 1.0 / years) - 1.0))


def _resolve_regions(regions: RegionMap | None,
                     include_inferior_lateral: bool) -> dict[str, tuple[int, ...]]:
  if regions is None:
    return default_regions(include_inferior_lateral)
  out = {}
  for name, ids in regions.items():
    ids = tuple(int(i) for i in np.atleast_1d(ids))
    if any(i < 0 for i in ids):
      raise ProgressionError(f'region {name!r}: label ids must be >= 0, got {ids}')
    out[str(name)] = ids
  return out


def _sum_ids(per_id: np.ndarray, ids: Sequence[int]) -> float:
  """Sums `per_id[i]` over distinct ids (an id listed twice is counted once)."""
  return float(sum(per_id[i] for i in set(ids) if i < per_id.shape[0]))


def _check_labels(labels: np.ndarray) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 3:
    raise ProgressionError(f'label map must be 3D [x, y, z], got shape {labels.shape}')
  if not np.issubdtype(labels.dtype, np.integer):
    if not np.issubdtype(labels.dtype, np.floating) or not np.all(np.isfinite(labels)):
      raise ProgressionError(f'label map must hold integer ids, got dtype {labels.dtype}')
    rounded = np.rint(labels)
    if np.any(np.abs(rounded - labels) > 1e-3):
      raise ProgressionError('label map has non-integer values')
    labels = rounded
  if labels.size and labels.min() < 0:
    raise ProgressionError(f'label map has negative ids (min {labels.min()})')
  return labels.astype(np.int64, copy=False)


def _check_voxel_volume(voxel_volume_ml: float) -> None:
  if not np.isfinite(voxel_volume_ml) or voxel_volume_ml <= 0:
    raise ProgressionError(f'voxel_volume_ml must be positive, got {voxel_volume_ml}')


def _check_volumes(v0, v1) -> tuple[np.ndarray, np.ndarray]:
  v0 = np.asarray(v0, dtype=np.float64)
  v1 = np.asarray(v1, dtype=np.float64)
  if not (np.all(np.isfinite(v0)) and np.all(np.isfinite(v1))):
    raise ProgressionError('volumes contain NaN or infinite values')
  if np.any(v0 <= 0):
    raise ProgressionError(f'baseline volume must be positive, got {v0.tolist()}')
  if np.any(v1 < 0):
    raise ProgressionError(f'follow-up volume must be >= 0, got {v1.tolist()}')
  return v0, v1


def _as_output(x: np.ndarray) -> float | np.ndarray:
  return float(x) if np.ndim(x) == 0 else x
