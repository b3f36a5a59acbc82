"""What a Forecaster takes in: baselines (paths, nibabel images or Volumes), covariates, years.

`prepare` loads a baseline and its optional label map, checks them, puts the baseline on the
model grid and picks how its regions are measured (`Subject.volume_method`): the label map,
else the built-in CSF/GM/WM tissue model (`evaluation.tissue`). `like_input` writes a result
back in the input file's own voxel order and affine.
"""

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np

from progression import covariates, io, labels as labels_lib, preprocess
from progression.errors import ProgressionError
from progression.evaluation import baselines, tissue, volumes

# Regions of the `evaluation.tissue` classes used without label maps (one definition, shared
# with the evaluation's baselines so forecasts and measurements name the same regions).
TISSUE_CLASSES = baselines.TISSUE_REGIONS
MAX_YEARS = 30.0  # Longest horizon accepted (years); the model is trained on a few years.
# Labels and image must share their grid up to this (mm, in the affine).
_GRID_TOLERANCE_MM = 1e-3

ImageLike = str | Path | io.Volume | nib.spatialimages.SpatialImage


@dataclasses.dataclass(frozen=True)
class Subject:
  """A baseline prepared for forecasting (`Forecaster.prepare`).

  Attributes:
    image: the baseline, canonical RAS+ (keeps the file's affine for outputs).
    labels: its label map on the same grid, or None.
    gridded: the baseline on the model grid (normalised intensities, grid affine).
    region_map: `[x, y, z]` int ids on `image`'s canonical grid: the labels, or tissue classes.
    regions: region name -> ids of `region_map`.
    volume_method: 'labels' or 'tissue'.
  """
  image: io.Volume
  labels: io.Volume | None
  gridded: preprocess.GriddedVolume
  region_map: np.ndarray
  regions: dict[str, tuple[int, ...]]
  volume_method: str

  def baseline_volumes_ml(self) -> dict[str, float]:
    """Regional volumes (mL) of `region_map` (`regions`)."""
    return volumes.regional_volumes_ml(self.region_map, self.image.voxel_volume_ml,
                                       regions=self.regions)

  def forecast_volumes_ml(self, jacobian: np.ndarray) -> dict[str, float]:
    """Regional volumes (mL) after a change of local volume `jacobian` (input voxels)."""
    measured = volumes.jacobian_integrated_volumes_ml(
        self.region_map, jacobian, self.image.voxel_volume_ml, regions=self.regions)
    return {k: float(v) for k, v in measured.items()}


def prepare(baseline: ImageLike, labels: ImageLike | None, grid: preprocess.Grid) -> Subject:
  """Loads and checks a baseline (and its labels on the same grid); puts it on `grid`.

  Warns once (naming the file) when the brain reaches beyond the model grid: the label
  map's brain (labels > 0 but extracerebral CSF), else the tissue model's GM and WM.
  """
  image = as_volume(baseline, io.load_image)
  label_map = None if labels is None else as_volume(labels, io.load_labels)
  if label_map is not None:
    _check_same_grid(image, label_map)
  gridded = preprocess.to_grid(image, grid, labels=label_map)
  if label_map is not None:
    brain = (label_map.data != labels_lib.BACKGROUND) & (label_map.data != labels_lib.CSF)
    preprocess.warn_if_brain_outside_grid(brain, image, grid, gridded.affine,
                                          'brain (label map)')
    return Subject(image, label_map, gridded, label_map.data,
                   volumes.default_regions(), 'labels')
  seg = tissue.segment_tissue(image.data)
  preprocess.warn_if_brain_outside_grid(seg >= tissue.GM, image, grid, gridded.affine,
                                        'brain (tissue model GM + WM)')
  return Subject(image, None, gridded, seg, dict(TISSUE_CLASSES), 'tissue')


def as_volume(value: ImageLike, loader) -> io.Volume:
  """A path, nibabel image or Volume -> canonical Volume (`loader`: io.load_image/load_labels)."""
  if isinstance(value, io.Volume):
    return value
  if isinstance(value, nib.spatialimages.SpatialImage):
    data = np.asarray(value.dataobj)
    path = value.get_filename()  # Names the file in messages when the image came from one.
    if loader is io.load_labels:
      rounded = np.rint(data)
      if not np.all(np.isfinite(data)) or np.any(np.abs(rounded - data) > 1e-3):
        raise ProgressionError(f'{path or "labels"}: label map has non-integer or non-finite '
                               'voxel values')
      return io.from_array(rounded.astype(np.int32), value.affine, path=path)
    return io.from_array(data.astype(np.float32), value.affine, path=path)
  return loader(value)


def as_covariates(cov: 'covariates.Covariates | Mapping[str, Any]') -> covariates.Covariates:
  """Covariates as given, or parsed (validated) from a mapping of raw values."""
  if isinstance(cov, covariates.Covariates):
    return cov
  return covariates.parse_covariates(cov, where='forecast covariates')


def check_years(years: float | Sequence[float]) -> list[float]:
  """Validates forecast intervals: at least one, each finite and in [0, MAX_YEARS] years."""
  try:
    values = [float(t) for t in np.atleast_1d(np.asarray(years, dtype=np.float64))]
  except (TypeError, ValueError):
    raise ProgressionError(f'years: expected numbers, got {years!r}') from None
  if not values:
    raise ProgressionError('years: give at least one interval')
  for t in values:
    if not np.isfinite(t) or not 0 <= t <= MAX_YEARS:
      raise ProgressionError(f'years: intervals must be in [0, {MAX_YEARS:g}] years, got {t:g}')
  return values


def like_input(data: np.ndarray, reference: io.Volume) -> nib.Nifti1Image:
  """A NIfTI image of `data` (on `reference`'s canonical grid) in the reference file's voxel
  order and affine; trailing axes (e.g. vector components) are kept."""
  image = nib.Nifti1Image(reference.to_original(data), reference.original_affine)
  image.set_sform(reference.original_affine, code=1)
  image.set_qform(reference.original_affine, code=1)
  image.header.set_xyzt_units('mm', 'sec')
  return image


def _check_same_grid(image: io.Volume, labels: io.Volume) -> None:
  if labels.data.shape != image.data.shape or not np.allclose(
      labels.affine, image.affine, atol=_GRID_TOLERANCE_MM):
    raise ProgressionError(
        f'{labels.path or "labels"}: the label map must be on the baseline image\'s voxel grid '
        f'(shape {image.original_shape}, same affine); got shape {labels.original_shape}. '
        'Resample it onto the image first (nearest neighbour).')
