"""Preprocessing: resample volumes onto the experiment grid, centre the brain, normalise intensity.

Every model sees the same `Grid` (shape in voxels, voxel size in mm, RAS+ axes), whatever the
scanner's field of view, resolution or orientation. Resampling goes through world coordinates
(mm), so any input affine (permuted, flipped, oblique) lands correctly: a target voxel is mapped
to world mm by the target affine, then to a (fractional) source voxel by the inverse source affine.

Arrays are `[x, y, z]` in RAS+ voxel order (see `progression.io`).
"""

import dataclasses
from collections.abc import Sequence

import numpy as np
from absl import logging
from scipy import ndimage

from progression.errors import ProgressionError
from progression.io import Volume

NEAREST = 0  # `order` for label maps: each output voxel takes one source voxel's id.
TRILINEAR = 1  # `order` for intensity images.


@dataclasses.dataclass(frozen=True)
class Grid:
  """The voxel grid models work on: RAS+ axes, no rotation, centred on a chosen world point.

  Attributes:
    shape: number of voxels along x, y, z.
    voxel_size_mm: voxel edge lengths along x, y, z in mm.
  """
  shape: tuple[int, int, int]
  voxel_size_mm: tuple[float, float, float]

  def __post_init__(self):
    shape = _as_shape(self.shape, 'Grid.shape')
    try:
      sizes = tuple(float(v) for v in np.ravel(self.voxel_size_mm))
    except (TypeError, ValueError):
      sizes = ()
    if len(sizes) != 3 or not all(np.isfinite(v) and v > 0 for v in sizes):
      raise ProgressionError(
          f'Grid.voxel_size_mm: expected 3 positive sizes in mm, got {self.voxel_size_mm!r}')
    object.__setattr__(self, 'shape', shape)
    object.__setattr__(self, 'voxel_size_mm', sizes)

  def affine(self, center_mm: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """The 4x4 voxel -> world (mm) matrix placing the grid's centre at `center_mm`.

    The centre is the point midway between the outermost voxel centres, i.e. voxel
    index `(shape - 1) / 2` (a voxel centre for odd sizes, a voxel corner for even ones).
    """
    center = np.asarray(center_mm, dtype=np.float64)
    if center.shape != (3,) or not np.all(np.isfinite(center)):
      raise ProgressionError(
          f'Grid.affine: center_mm must be 3 finite mm values, got {center_mm!r}')
    sizes = np.asarray(self.voxel_size_mm)
    affine = np.diag([*sizes, 1.0])
    affine[:3, 3] = center - sizes * (np.asarray(self.shape) - 1) / 2.0
    return affine


@dataclasses.dataclass(frozen=True)
class GriddedVolume:
  """An image (and optionally its label map) resampled onto a `Grid`.

  Attributes:
    image: float32 `[x, y, z]` intensities normalised by `normalize_intensity`.
    labels: int32 `[x, y, z]` label ids (nearest-neighbour resampled), or None.
    affine: 4x4 voxel -> world (mm) matrix of the grid (`Grid.affine(center_mm)`).
  """
  image: np.ndarray
  labels: np.ndarray | None
  affine: np.ndarray


def resample(data: np.ndarray, source_affine: np.ndarray, target_shape: Sequence[int],
             target_affine: np.ndarray, order: int) -> np.ndarray:
  """Resamples a 3D array onto another voxel grid through world (mm) coordinates.

  Target voxel `t` takes the source value at voxel `inv(source_affine) @ target_affine @ t`.
  Uses `scipy.ndimage.affine_transform`, i.e. `map_coordinates` with that affine map,
  without materialising a coordinate array per voxel.

  Args:
    data: source `[x, y, z]` array.
    source_affine: 4x4 voxel -> world (mm) matrix of `data`.
    target_shape: output shape in voxels.
    target_affine: 4x4 voxel -> world (mm) matrix of the output.
    order: 0 nearest neighbour (label maps: ids are kept, never blended) or
      1 trilinear (images; exact for intensities linear in world position).

  Returns:
    The resampled array: `data`'s dtype for order 0; float32 for order 1 (float64 input
    stays float64). Outside the source the value is 0: with order 0 each source voxel
    covers its own box (+-half a voxel); with order 1 values fade linearly to 0 over one
    voxel beyond the outermost source voxel centres.
  """
  data = np.asarray(data)
  if data.ndim != 3:
    raise ProgressionError(f'resample: data must be a 3D [x, y, z] array, got shape {data.shape}')
  source_affine = _as_affine(source_affine, 'resample: source_affine')
  target_affine = _as_affine(target_affine, 'resample: target_affine')
  target_shape = _as_shape(target_shape, 'resample: target_shape')
  if order not in (NEAREST, TRILINEAR):
    raise ProgressionError(f'resample: order must be 0 (nearest) or 1 (trilinear), got {order!r}')
  out_dtype = data.dtype if order == NEAREST else _float_dtype(data.dtype)
  target_to_source = np.linalg.solve(source_affine, target_affine)
  if target_shape == data.shape and np.allclose(target_to_source, np.eye(4), atol=1e-9):
    return data.astype(out_dtype, copy=True)
  return ndimage.affine_transform(
      data.astype(out_dtype, copy=False), target_to_source, output_shape=target_shape,
      output=out_dtype, order=order, mode='grid-constant', cval=0, prefilter=False)


_BRAIN_PERCENTILE = 99.5  # Robust maximum for the brain-centre threshold.


def brain_center_mm(volume: Volume, threshold_fraction: float = 0.1) -> np.ndarray:
  """World position (mm) of the centroid of the image's foreground, shape [3].

  Foreground: voxels above `min + threshold_fraction * (p99.5 - min)`; the 99.5th percentile
  instead of the maximum keeps a few very bright voxels from raising the threshold. Every
  foreground voxel counts the same (not weighted by intensity), so bias fields barely move it.
  """
  data = np.asarray(volume.data, dtype=np.float32)
  high = float(np.percentile(data, _BRAIN_PERCENTILE))
  return _brain_center_mm(volume, data, high, threshold_fraction)


def _brain_center_mm(volume: Volume, data: np.ndarray, high: float,
                     threshold_fraction: float = 0.1) -> np.ndarray:
  """`brain_center_mm` given the 99.5th percentile `high` of `data` (= volume.data)."""
  if not 0.0 <= threshold_fraction < 1.0:
    raise ProgressionError(f'brain_center_mm: threshold_fraction must be in [0, 1), got '
                           f'{threshold_fraction!r}')
  low = float(data.min())
  foreground = data > low + threshold_fraction * (high - low)
  count = np.count_nonzero(foreground)
  if not count:
    raise ProgressionError(f'{volume.path or "<array>"}: image is blank (constant intensity); '
                           'cannot find the brain')
  # Centroid from the per-axis marginal counts (no array of voxel indices).
  center_voxel = []
  for axis, n in enumerate(data.shape):
    counts = np.count_nonzero(foreground, axis=tuple(a for a in range(3) if a != axis))
    center_voxel.append(np.dot(counts, np.arange(n)) / count)
  return (volume.affine @ np.append(center_voxel, 1.0))[:3]


_NORMALIZE_PERCENTILES = (1.0, 99.0)
_NORMALIZE_CLIP = (0.0, 1.5)


def normalize_intensity(data: np.ndarray, mask: np.ndarray | None = None,
                        percentiles: tuple[float, float] = _NORMALIZE_PERCENTILES,
                        clip: tuple[float, float] | None = _NORMALIZE_CLIP) -> np.ndarray:
  """Robust linear intensity scaling: the low percentile maps to 0, the high one to 1.

  MRI intensities have no absolute unit, so each image is scaled by its own percentiles
  (computed inside `mask`, or over all voxels) rather than min/max, which single hot or
  dark voxels would dominate. The scaling applies to every voxel, inside the mask or not.

  Args:
    data: `[x, y, z]` intensities.
    mask: optional boolean array of `data`'s shape selecting the voxels for the percentiles.
    percentiles: (low, high) percentiles in [0, 100], low < high.
    clip: output range after scaling, or None for no clipping. The default (0, 1.5) drops
      negative noise and keeps structures somewhat brighter than the high percentile
      (vessels, fat) without letting outliers stretch the range.

  Returns:
    float32 array of `data`'s shape.
  """
  data = _finite_float32(data)
  low_pct, high_pct = (float(p) for p in percentiles)
  if not 0.0 <= low_pct < high_pct <= 100.0:
    raise ProgressionError(f'normalize_intensity: percentiles must satisfy 0 <= low < high <= 100, '
                           f'got {percentiles!r}')
  values = data if mask is None else data[_as_mask(mask, data.shape)]
  low, high = np.percentile(values, [low_pct, high_pct])
  return _scale(data, low, high, (low_pct, high_pct), clip)


def _finite_float32(data: np.ndarray) -> np.ndarray:
  data = np.asarray(data, dtype=np.float32)
  if not np.all(np.isfinite(data)):
    raise ProgressionError('normalize_intensity: data contains NaN or infinite values')
  return data


def _scale(data: np.ndarray, low: float, high: float, percentiles: tuple[float, float],
           clip: tuple[float, float] | None) -> np.ndarray:
  """`normalize_intensity` of float32 `data` given its (low, high) percentile values."""
  if not high > low:
    raise ProgressionError(f'normalize_intensity: the {percentiles[0]:g}th and '
                           f'{percentiles[1]:g}th percentiles are equal ({low:g}); the image '
                           '(or masked region) is constant')
  scaled = (data - np.float32(low)) / np.float32(high - low)
  if clip is not None:
    scaled = np.clip(scaled, *clip)
  return scaled.astype(np.float32, copy=False)


def to_grid(image: Volume, grid: Grid, labels: Volume | None = None,
            center_mm: Sequence[float] | None = None) -> GriddedVolume:
  """Puts an image (and its labels) on the experiment grid, centred on the brain.

  The image is intensity-normalised on its own full field of view first (so the
  percentiles do not depend on how the grid crops it; the 0 filled in outside the
  source is then the normalised background), then resampled trilinearly. Labels are
  resampled by nearest neighbour through their own affine, so they may come on a
  different voxel grid than the image (e.g. a 1 mm segmentation of a 1.2 mm scan).

  Args:
    image: the intensity volume (canonical RAS+).
    grid: the target grid.
    labels: optional label map of the same subject and session.
    center_mm: world point (mm) placed at the grid centre; defaults to
      `brain_center_mm(image)`.
  """
  data = _finite_float32(image.data)
  # One selection pass for the normalisation's and the brain centre's percentiles.
  low, high, brain_high = np.percentile(data, [*_NORMALIZE_PERCENTILES, _BRAIN_PERCENTILE])
  if center_mm is None:
    center_mm = _brain_center_mm(image, data, float(brain_high))
  affine = grid.affine(center_mm)
  normalised = _scale(data, low, high, _NORMALIZE_PERCENTILES, _NORMALIZE_CLIP)
  gridded_image = resample(normalised, image.affine, grid.shape, affine, order=TRILINEAR)
  gridded_labels = None
  if labels is not None:
    gridded_labels = resample(np.asarray(labels.data, dtype=np.int32), labels.affine, grid.shape,
                              affine, order=NEAREST)
    if np.any(labels.data) and not np.any(gridded_labels):
      raise ProgressionError(f'{labels.path or "<labels>"}: label map does not overlap the grid '
                             f'around {np.round(center_mm, 1).tolist()} mm; is it the label map of '
                             f'{image.path or "this image"} (same world space)?')
  return GriddedVolume(image=gridded_image.astype(np.float32, copy=False), labels=gridded_labels,
                       affine=affine)


def voxels_outside_grid(mask: np.ndarray, mask_affine: np.ndarray, grid: Grid,
                        grid_affine: np.ndarray) -> int:
  """How many voxels of `mask` have their centre outside the grid's box.

  The box is the grid's voxels with their extent: model voxel coordinates in
  [-0.5, n - 0.5] along each axis, through world mm (`mask_affine`, then `grid_affine`).

  Args:
    mask: `[x, y, z]` bool (e.g. a brain mask on the input image's voxels).
    mask_affine: 4x4 voxel -> world (mm) matrix of `mask`.
    grid: the model grid.
    grid_affine: 4x4 voxel -> world (mm) matrix of the grid (`GriddedVolume.affine`).
  """
  mask = np.asarray(mask, dtype=bool)
  if mask.ndim != 3:
    raise ProgressionError(f'voxels_outside_grid: mask must be 3D [x, y, z], got {mask.shape}')
  to_grid = np.linalg.solve(_as_affine(grid_affine, 'voxels_outside_grid: grid_affine'),
                            _as_affine(mask_affine, 'voxels_outside_grid: mask_affine'))
  index = np.stack(np.nonzero(mask), axis=-1).astype(np.float64)
  at = index @ to_grid[:3, :3].T + to_grid[:3, 3]
  inside = np.all((at >= -0.5) & (at <= np.asarray(grid.shape) - 0.5), axis=-1)
  return int(np.count_nonzero(~inside))


def warn_if_brain_outside_grid(brain: np.ndarray, volume: Volume, grid: Grid,
                               grid_affine: np.ndarray, what: str = 'brain') -> int:
  """Logs one warning, naming `volume`'s file, when brain voxels fall outside the grid.

  Outside the model grid the model sees nothing and the forecast's Jacobian is 1, so the
  regional volumes there count as unchanged and whole-brain change shrinks toward none.

  Args:
    brain: `[x, y, z]` bool brain mask on `volume`'s (canonical) voxels.
    volume: the image the mask belongs to (its `path` names it, its affine places it).
    grid: the model grid.
    grid_affine: 4x4 voxel -> world (mm) matrix of the grid as placed for this image.
    what: how the mask was made, for the message (e.g. 'brain (label map)').

  Returns:
    The number of brain voxels outside the grid (0: no warning).
  """
  outside = voxels_outside_grid(brain, volume.affine, grid, grid_affine)
  if outside:
    total = max(int(np.count_nonzero(brain)), 1)
    extent = [round(n * v, 1) for n, v in zip(grid.shape, grid.voxel_size_mm)]
    logging.warning(
        '%s: %.1f %% of the %s (%.1f mL) lies outside the model grid (%s voxels x %s mm = %s '
        'mm, centred at %s mm): the model does not see it and counts it as unchanged. Use an '
        'experiment grid that covers the brain (the default is 96 x 112 x 96 at 2 mm).',
        volume.path or '<image>', 100.0 * outside / total, what,
        outside * volume.voxel_volume_ml, list(grid.shape), list(grid.voxel_size_mm), extent,
        np.round(grid_affine[:3, :3] @ ((np.asarray(grid.shape) - 1) / 2.0)
                 + grid_affine[:3, 3], 1).tolist())
  return outside


def crop_or_pad(data: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """Centre-crops or zero-pads the leading axes of `data` to `shape` (voxels).

  Along each axis of old size `n` and new size `m`, new index `i` holds old index
  `i + (n - m) // 2` (when cropping an odd excess, the extra voxel goes from the end;
  when padding, the extra zero goes at the start). To keep world positions, shift
  the affine by that offset: `new_affine = affine @ translation((n - m) // 2)`.
  Trailing axes beyond `len(shape)` (e.g. channels) are kept.
  """
  data = np.asarray(data)
  shape = tuple(int(s) for s in shape)
  if len(shape) > data.ndim or any(s < 1 for s in shape):
    raise ProgressionError(f'crop_or_pad: cannot fit an array of shape {data.shape} to {shape}')
  out = np.zeros(shape + data.shape[len(shape):], dtype=data.dtype)
  src, dst = [], []
  for old, new in zip(data.shape, shape):
    start = (old - new) // 2  # negative when padding
    lo, hi = max(start, 0), min(start + new, old)
    src.append(slice(lo, hi))
    dst.append(slice(lo - start, hi - start))
  out[tuple(dst)] = data[tuple(src)]
  return out


def _as_shape(shape: Sequence[int], name: str) -> tuple[int, int, int]:
  try:
    values = tuple(float(v) for v in np.ravel(shape))
  except (TypeError, ValueError):
    values = ()
  if len(values) != 3 or not all(v.is_integer() and v >= 1 for v in values):
    raise ProgressionError(f'{name}: expected 3 positive voxel counts, got {shape!r}')
  return tuple(int(v) for v in values)


def _as_affine(affine: np.ndarray, name: str) -> np.ndarray:
  affine = np.asarray(affine, dtype=np.float64)
  if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
    raise ProgressionError(f'{name}: expected a finite 4x4 matrix, got shape {affine.shape}')
  if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
    raise ProgressionError(f'{name}: affine is singular (zero voxel volume)')
  return affine


def _as_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  mask = np.asarray(mask)
  if mask.shape != shape:
    raise ProgressionError(f'normalize_intensity: mask shape {mask.shape} differs from data shape '
                           f'{shape}')
  mask = mask.astype(bool)
  if not mask.any():
    raise ProgressionError('normalize_intensity: mask is empty')
  return mask


def _float_dtype(dtype: np.dtype) -> np.dtype:
  """float64 stays float64 (analysis code); everything else interpolates in float32."""
  return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)
