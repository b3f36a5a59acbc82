"""Within-subject rigid registration: each follow-up onto its baseline (6 dof), checked and cached.

Head position changes between sessions; left alone, training learns the repositioning as
atrophy and evaluation scores it as such. This stage finds the rigid transform between a
follow-up and its baseline with SimpleITK (ITK's registration framework: Mattes mutual
information, versor rigid transform initialised at the centres of mass, regular-step gradient
descent over a 2-8 mm pyramid). SimpleITK was chosen over ANTsPy by measurement on phantom
pairs with up to 3 mm / 3 degrees of motion (see pyproject.toml for the numbers).

Convention: `RigidTransform.fixed_to_moving` (4x4, world mm, RAS+) maps a point of the
fixed (baseline) world to the point of the moving (follow-up) world that shows the same
anatomy (ITK's convention: what resampling the follow-up onto the baseline grid needs).
`moving_to_fixed` is its inverse, i.e. the simulator's per-visit `motion` transform
(`synthetic.simulate_subject`: follow-up voxel x shows baseline-space point T x).

Each registration is checked (`check`): the correlation of the aligned pair's edges inside
the baseline's head, and inverse consistency (the pair registered the other way too; the
two transforms composed must be the identity, measured as the largest displacement over the
baseline head's bounding box and the rotation angle). A pair that fails is named by file;
cohorts choose whether it is refused or skipped (`[registration] on_failure` in the spec).

Registrations are cached as small JSON files keyed by both files' absolute path, size and
modification time (nanoseconds): a changed file is registered again. Resampling is not
cached (it takes a fraction of a second; the registration takes seconds): `in_fixed_space`
re-expresses a follow-up in the baseline's world without resampling (only the affine
changes), so the experiment grid is reached with one interpolation; `onto_fixed_grid`
resamples onto the baseline's voxel grid (images trilinear, labels nearest neighbour).
"""

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
from absl import logging
from scipy import ndimage

from progression import io, preprocess
from progression.errors import ProgressionError

# Check thresholds. Measured on phantom pairs (48x56x48 at 2 mm: head shrunk to fit) with up
# to 3 mm / 3 degrees of motion: same-subject pairs reach edge correlations 0.957-0.965 and
# inverse discrepancies <= 0.2 mm / 0.13 degree; the follow-up turned by 180 degrees reaches
# 0.69-0.78 (plain intensity correlation: 0.85-0.91, too close to the 0.965 of good pairs:
# the head is nearly symmetric), another subject's head 0.65.
MIN_CORRELATION = 0.85
_EDGE_SIGMA_MM = 2.0
# Inverse consistency is as precise as the voxels allow: at 3 mm a good pair of a moved
# cohort (up to 3 mm / 3 degrees each way) disagreed by 1.05 mm at the head's box corners.
MAX_INVERSE_MM = 1.0  # ... or MAX_INVERSE_VOXELS voxels, whichever is larger.
MAX_INVERSE_VOXELS = 0.5
MAX_INVERSE_DEG = 1.0
ON_FAILURE = ('error', 'skip')
_CACHE_VERSION = 2  # Bump when the registration settings change, to invalidate caches.
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS+ <-> ITK's LPS world coordinates.
_SAMPLING_FRACTION = 0.25  # Random fraction of voxels the metric samples per level.
_SEED = 1  # Sampling seed: the same pair gives the same transform.
_FOREGROUND_FRACTION = 0.1  # Head mask: voxels above min + 0.1 (p99.5 - min).


@dataclasses.dataclass(frozen=True)
class RigidTransform:
  """A rigid transform between two images' world spaces (mm, RAS+).

  Attributes:
    fixed_to_moving: 4x4 matrix taking a fixed-world point (mm) to the moving-world point
      showing the same anatomy.
  """
  fixed_to_moving: np.ndarray

  @property
  def moving_to_fixed(self) -> np.ndarray:
    """The inverse 4x4 matrix (moving world -> fixed world, mm)."""
    return np.linalg.inv(self.fixed_to_moving)

  @property
  def rotation_deg(self) -> float:
    """Rotation angle in degrees."""
    return rotation_angle_deg(self.fixed_to_moving)


@dataclasses.dataclass(frozen=True)
class Registration:
  """A checked registration of a moving (follow-up) image to a fixed (baseline) image.

  Attributes:
    transform: the rigid transform found.
    metric: final Mattes mutual information (negative; lower is better).
    correlation: Pearson correlation of the edges (gradient magnitudes after Gaussian
      smoothing, sigma `_EDGE_SIGMA_MM`) of the fixed image and the aligned moving image
      inside the fixed image's head mask (1 = identical up to gain and offset).
    inverse_mm: largest displacement (mm) over the fixed head's bounding box of the forward
      transform composed with the separately found backward one (0 when consistent).
    inverse_deg: rotation angle (degrees) of that composition.
    seconds: time both registrations took.
    failure: why the check failed, or None when it passed.
  """
  transform: RigidTransform
  metric: float
  correlation: float
  inverse_mm: float
  inverse_deg: float
  seconds: float
  failure: str | None = None

  @property
  def ok(self) -> bool:
    return self.failure is None

  def to_dict(self) -> dict:
    return {'fixed_to_moving': self.transform.fixed_to_moving.tolist(), 'metric': self.metric,
            'correlation': self.correlation, 'inverse_mm': self.inverse_mm,
            'inverse_deg': self.inverse_deg, 'seconds': self.seconds, 'failure': self.failure}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'Registration':
    return cls(transform=RigidTransform(np.asarray(d['fixed_to_moving'], np.float64)),
               metric=float(d['metric']), correlation=float(d['correlation']),
               inverse_mm=float(d['inverse_mm']), inverse_deg=float(d['inverse_deg']),
               seconds=float(d['seconds']), failure=d['failure'])


# ----------------------------------------------------------------------------- registering

def register_rigid(fixed: io.Volume, moving: io.Volume) -> tuple[RigidTransform, float]:
  """Finds the rigid (6 dof) transform aligning `moving` to `fixed`.

  Mattes mutual information (32 bins, 25 % of the voxels sampled at random, fixed seed),
  versor rigid transform started at the intensity centres of mass, regular-step gradient
  descent with physical-shift scales, over a pyramid whose levels have 2-8 mm voxels (and
  the native grid when it is coarser than 2 mm).

  Args:
    fixed: the reference image (baseline), canonical RAS+.
    moving: the image to align (follow-up), same subject and contrast.

  Returns:
    (transform with `fixed_to_moving`, final metric value).
  """
  fixed_image, moving_image = _to_sitk(fixed), _to_sitk(moving)
  initial = sitk.CenteredTransformInitializer(
      fixed_image, moving_image, sitk.VersorRigid3DTransform(),
      sitk.CenteredTransformInitializerFilter.MOMENTS)
  method = sitk.ImageRegistrationMethod()
  method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
  method.SetMetricSamplingStrategy(method.RANDOM)
  method.SetMetricSamplingPercentage(_SAMPLING_FRACTION, _SEED)
  method.SetInterpolator(sitk.sitkLinear)
  method.SetOptimizerAsRegularStepGradientDescent(
      learningRate=1.0, minStep=1e-4, numberOfIterations=300, relaxationFactor=0.5,
      gradientMagnitudeTolerance=1e-8)
  method.SetOptimizerScalesFromPhysicalShift()
  shrink = _shrink_factors(min(fixed.voxel_size_mm))
  voxel_mm = min(fixed.voxel_size_mm)
  method.SetShrinkFactorsPerLevel(shrink)
  method.SetSmoothingSigmasPerLevel([(s - 1) * voxel_mm / 2.0 for s in shrink])
  method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
  method.SetInitialTransform(initial, inPlace=False)
  try:
    found = method.Execute(fixed_image, moving_image)
  except RuntimeError as e:  # ITK: e.g. too few samples in the overlap.
    raise ProgressionError(f'{moving.path or "<moving>"}: rigid registration to '
                           f'{fixed.path or "<fixed>"} failed: {str(e).strip()[-300:]}') from None
  return RigidTransform(_LPS @ _matrix_of(found) @ _LPS), float(method.GetMetricValue())


def check(fixed: io.Volume, moving: io.Volume, transform: RigidTransform,
          backward: RigidTransform | None = None) -> dict[str, float | str | None]:
  """The quality numbers of a registration and whether they pass.

  Args:
    fixed, moving: the registered images.
    transform: `fixed_to_moving` found by `register_rigid(fixed, moving)`.
    backward: the transform found by `register_rigid(moving, fixed)` (its `fixed_to_moving`
      maps `moving`'s world to `fixed`'s); None skips the inverse-consistency test.

  Returns:
    {'correlation', 'inverse_mm', 'inverse_deg', 'failure'} (see `Registration`; the
    inverse numbers are 0 without `backward`; failure None when every threshold holds).
  """
  mask = _head_mask(fixed.data)
  aligned = preprocess.resample(moving.data.astype(np.float32),
                                transform.moving_to_fixed @ moving.affine, fixed.data.shape,
                                fixed.affine, preprocess.TRILINEAR)
  sigma = [max(1.0, _EDGE_SIGMA_MM / v) for v in fixed.voxel_size_mm]  # voxels
  edges = [ndimage.gaussian_gradient_magnitude(np.asarray(a, np.float64), sigma)[mask]
           for a in (fixed.data, aligned)]
  correlation = float(np.corrcoef(*edges)[0, 1])
  inverse_mm = inverse_deg = 0.0
  if backward is not None:
    inverse_mm, inverse_deg = discrepancy(backward.fixed_to_moving @ transform.fixed_to_moving,
                                          np.eye(4), _box_corners_mm(fixed.affine, mask))
  failures = []
  max_inverse_mm = max(MAX_INVERSE_MM, MAX_INVERSE_VOXELS * min(fixed.voxel_size_mm))
  if not correlation >= MIN_CORRELATION:
    failures.append(f'edge correlation after alignment {correlation:.3f} < '
                    f'{MIN_CORRELATION}')
  if inverse_mm > max_inverse_mm or inverse_deg > MAX_INVERSE_DEG:
    failures.append(f'registering both ways disagrees by {inverse_mm:.2f} mm / '
                    f'{inverse_deg:.2f} degrees (> {max_inverse_mm:.2g} mm / {MAX_INVERSE_DEG} '
                    'deg)')
  return {'correlation': correlation, 'inverse_mm': inverse_mm, 'inverse_deg': inverse_deg,
          'failure': '; '.join(failures) or None}


def register_checked(fixed: io.Volume, moving: io.Volume, inverse_check: bool = True
                     ) -> Registration:
  """`register_rigid` both ways (or one way without `inverse_check`) plus `check`."""
  start = time.perf_counter()
  transform, metric = register_rigid(fixed, moving)
  backward = register_rigid(moving, fixed)[0] if inverse_check else None
  seconds = time.perf_counter() - start
  return Registration(transform=transform, metric=metric, seconds=seconds,
                      **check(fixed, moving, transform, backward))


def register_cached(fixed: io.Volume, moving: io.Volume, cache_dir: str | os.PathLike | None
                    ) -> Registration:
  """`register_checked`, read from / written to `cache_dir` when both volumes have files.

  The cache key is both files' absolute path, size and modification time (ns) and the
  registration settings' version; entries are JSON files written atomically (temporary file,
  then rename), so concurrent runs at worst register the same pair twice.
  """
  cache = _cache_path(fixed, moving, cache_dir)
  if cache is not None and cache.is_file():
    try:
      return Registration.from_dict(json.loads(cache.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
      logging.warning('%s: unreadable registration cache entry; registering again', cache)
  registration = register_checked(fixed, moving)
  if cache is not None:
    _write_atomic(cache, json.dumps(registration.to_dict()))
  return registration


def discrepancy(a: np.ndarray, b: np.ndarray, points_mm: np.ndarray) -> tuple[float, float]:
  """How far two 4x4 transforms disagree: (largest distance in mm between `a p` and `b p`
  over `points_mm` `[n, 3]`, rotation angle of `a^-1 b` in degrees)."""
  points = np.c_[points_mm, np.ones(len(points_mm))]
  distance = np.linalg.norm((points @ (a - b).T)[:, :3], axis=1).max()
  return float(distance), rotation_angle_deg(np.linalg.solve(a, b))


def rotation_angle_deg(matrix: np.ndarray) -> float:
  """Rotation angle (degrees) of the 3x3 part of a rigid 4x4 transform."""
  cosine = (np.trace(np.asarray(matrix)[:3, :3]) - 1.0) / 2.0
  return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


# ----------------------------------------------------------------------------- applying

def in_fixed_space(volume: io.Volume, transform: RigidTransform) -> io.Volume:
  """The moving `volume` (image or labels) re-expressed in the fixed world: same voxels,
  affine `moving_to_fixed @ affine`. No resampling, so no interpolation blur."""
  m = transform.moving_to_fixed
  return dataclasses.replace(volume, affine=m @ volume.affine,
                             original_affine=m @ volume.original_affine)


def onto_fixed_grid(volume: io.Volume, transform: RigidTransform, fixed: io.Volume,
                    labels: bool = False) -> io.Volume:
  """The moving `volume` resampled onto `fixed`'s voxel grid (trilinear; nearest neighbour
  for `labels`, ids kept); voxels outside the moving field of view are 0."""
  moved = in_fixed_space(volume, transform)
  order = preprocess.NEAREST if labels else preprocess.TRILINEAR
  data = preprocess.resample(moved.data, moved.affine, fixed.data.shape, fixed.affine, order)
  return dataclasses.replace(fixed, data=data, path=volume.path)


def checked_or_refused(registration: Registration, fixed: io.Volume, moving: io.Volume
                       ) -> Registration:
  """Returns `registration` when it passed its check, else raises naming both files."""
  if registration.ok:
    return registration
  raise ProgressionError(failure_message(moving.path, fixed.path, registration))


def failure_message(moving_path: Any, fixed_path: Any, registration: Registration) -> str:
  return (f'{moving_path}: rigid registration to its baseline {fixed_path} failed the check '
          f'({registration.failure}); are both the same subject\'s T1w? Set [registration] '
          'on_failure = "skip" in the cohort spec to leave such pairs out')


# ----------------------------------------------------------------------------- cohorts

def register_pairs(pairs: pd.DataFrame, cache_dir: str | os.PathLike | None, on_failure: str,
                   progress: Callable[[int, int], None] | None = None
                   ) -> tuple[pd.DataFrame, list[Registration]]:
  """Registers the follow-up image of every pair (`cohort.make_pairs` rows) to its baseline.

  Args:
    pairs: rows with 'baseline_image' and 'followup_image' paths.
    cache_dir: registration cache (see `register_cached`); None: no cache.
    on_failure: 'error' raises when any pair fails its check, naming every failing pair's
      files; 'skip' leaves those pairs out, each named in a warning.
    progress: called with (pairs done, pairs).

  Returns:
    (the kept pairs, index reset; their registrations, in row order).
  """
  if on_failure not in ON_FAILURE:
    raise ProgressionError(f'registration on_failure = {on_failure!r} is not one of '
                           f'{list(ON_FAILURE)}')
  keep, registrations, failures = [], [], []
  loaded: dict[str, io.Volume] = {}

  def load(path: str) -> io.Volume:
    if path not in loaded:
      if len(loaded) > 8:
        loaded.clear()
      loaded[path] = io.load_image(path)
    return loaded[path]

  rows = pairs.to_dict('records')
  for n, row in enumerate(rows):
    registration = register_cached(load(row['baseline_image']), load(row['followup_image']),
                                   cache_dir)
    if registration.ok:
      keep.append(n)
      registrations.append(registration)
    else:
      failures.append(failure_message(row['followup_image'], row['baseline_image'],
                                      registration))
    if progress is not None:
      progress(n + 1, len(rows))
  if failures and on_failure == 'error':
    raise ProgressionError(f'{len(failures)} of {len(rows)} pairs failed registration: '
                           + ' | '.join(failures[:5])
                           + (f' | ... and {len(failures) - 5} more' if len(failures) > 5
                              else ''))
  for message in failures:
    logging.warning('skipping the pair: %s', message)
  return pairs.iloc[keep].reset_index(drop=True), registrations


def default_cache_dir() -> Path:
  """`$XDG_CACHE_HOME/progression/registration` (default `~/.cache/...`)."""
  root = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
  return Path(root) / 'progression' / 'registration'


# ----------------------------------------------------------------------------- helpers

def _to_sitk(volume: io.Volume) -> sitk.Image:
  """A canonical RAS+ `Volume` as an ITK image (index order x, y, z; LPS world)."""
  image = sitk.GetImageFromArray(np.ascontiguousarray(volume.data.astype(np.float32).T))
  lps = _LPS @ volume.affine
  spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
  image.SetSpacing(spacing.tolist())
  image.SetOrigin(lps[:3, 3].tolist())
  image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
  return image


def _matrix_of(transform: sitk.Transform) -> np.ndarray:
  """The 4x4 matrix of an affine ITK transform, from the images of the origin and axes."""
  origin = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
  matrix = np.eye(4)
  for axis in range(3):
    unit = np.zeros(3)
    unit[axis] = 1.0
    matrix[:3, axis] = np.asarray(transform.TransformPoint(unit.tolist())) - origin
  matrix[:3, 3] = origin
  return matrix


def _shrink_factors(voxel_mm: float) -> list[int]:
  """Pyramid shrink factors, coarse to fine, whose levels have 2-8 mm voxels (1 mm data ends
  at 2 mm: finer levels cost much and gained nothing measurable); [1] beyond 8 mm."""
  factors = [s for s in (16, 8, 4, 2, 1) if 2.0 - 1e-6 <= s * voxel_mm <= 8.0 + 1e-6]
  return factors or [1]


def _head_mask(data: np.ndarray) -> np.ndarray:
  data = np.asarray(data, np.float32)
  low, high = float(data.min()), float(np.percentile(data, 99.5))
  return data > low + _FOREGROUND_FRACTION * (high - low)


def _box_corners_mm(affine: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """World (mm) corners `[8, 3]` of the bounding box of `mask`'s voxels."""
  voxels = np.argwhere(mask) if mask.any() else np.argwhere(np.ones_like(mask))
  low, high = voxels.min(axis=0), voxels.max(axis=0)
  corners = np.array([[(low, high)[b][a] for a, b in enumerate(bits)]
                      for bits in np.ndindex(2, 2, 2)], np.float64)
  return corners @ affine[:3, :3].T + affine[:3, 3]


def _file_key(path: str | None) -> str | None:
  if path is None:
    return None
  try:
    stat = os.stat(path)
  except OSError:
    return None
  return f'{Path(path).absolute()}|{stat.st_size}|{stat.st_mtime_ns}'


def _cache_path(fixed: io.Volume, moving: io.Volume, cache_dir) -> Path | None:
  keys = [_file_key(fixed.path), _file_key(moving.path)]
  if cache_dir is None or None in keys:
    return None
  digest = hashlib.sha1('|'.join([f'v{_CACHE_VERSION}', *keys]).encode()).hexdigest()[:24]
  return Path(cache_dir) / f'{digest}.json'


def _write_atomic(path: Path, text: str) -> None:
  """Writes `text` to a temporary file beside `path`, then renames it onto `path`."""
  io.make_folder(path.parent, 'registration cache folder')
  try:
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.stem}-', suffix='.json.tmp', dir=path.parent)
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    os.replace(tmp, path)
  except OSError as e:
    raise ProgressionError(f'{path}: cannot write the registration cache: {e}') from None
