"""The simulator's known atrophy deformation: velocity fields on a coarse grid, integrated.

Primitives `progression.synthetic` and `atrophy_calibration` use to give a phantom
(`progression.phantom`) its true atrophy: the coarse velocity grid, smooth per-structure
unit velocity fields (`velocity_basis`), scaling and squaring (`integrate`), trilinear
sampling and upsampling to the image grid, and the Jacobian determinant of a displacement.
Arrays are component-first, `[3, x, y, z]` (mm), as in `phantom`.
"""

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from progression import phantom

WINDOW = 1.25  # Local atrophy field window / structure semi-axes.
COARSE_POINTS = 32  # Velocity grid points across the smallest field-of-view side (at most).


@dataclasses.dataclass(frozen=True)
class CoarseGrid:
  """Velocity grid: every `factor`-th voxel of the image grid (world mm, `[3, ...]`)."""
  factor: int
  spacing_mm: float
  full_shape: tuple[int, int, int]
  world: np.ndarray


def coarse_grid(shape: tuple[int, int, int], voxel_mm: float) -> CoarseGrid:
  """The velocity grid: spacing ~ smallest field-of-view side / 32, a multiple of the voxel."""
  factor = max(1, int(min(shape) / COARSE_POINTS + 1e-6))
  coarse = tuple(int(math.ceil((n - 1) / factor)) + 1 for n in shape)
  axes = [(np.arange(c) * factor - 0.5 * (n - 1)) * voxel_mm for c, n in zip(coarse, shape)]
  world = np.stack(np.meshgrid(*axes, indexing='ij'), axis=0).astype(np.float32)
  return CoarseGrid(factor, factor * voxel_mm, tuple(shape), world)


def velocity_basis(anat: phantom.Anatomy, grid: CoarseGrid,
                   fields: Sequence[tuple[str, int] | None]) -> np.ndarray:
  """Unit velocity fields (mm/year per unit coefficient), `[len(fields), 3, ...]` float32.

  A field None is the whole-brain one: x - c times a window that is 1 inside the brain and
  falls smoothly to 0 across the CSF shell (divergence 3 inside the brain; the skull does not
  move). A field (structure name, side 0=left/1=right) is x - c times a Gaussian window
  shaped like that structure's ellipsoid, `WINDOW` x its semi-axes (divergence ~3 at its
  centre, the opposite sign around it).
  """
  x = grid.world
  basis = np.zeros((len(fields),) + x.shape, dtype=np.float32)
  r = phantom.anatomical_coordinates(anat, x)
  rho = np.sqrt(sum((r[i] / np.float32(anat.brain.axes[i])) ** 2 for i in range(3)))
  skull = float(np.min(np.asarray(phantom.ICV_AXES) * anat.shell / anat.brain.axes))
  s = np.clip((rho - 1.0) / (skull - 1.0), 0.0, 1.0)
  window = 1.0 - s * s * (3.0 - 2.0 * s)
  structures = {s.name: s for s in anat.deep}
  for j, field in enumerate(fields):
    if field is None:
      center = phantom.world_position(anat, anat.brain.center.reshape(3, 1))[:, 0]
      basis[j] = window * (x - center.reshape(3, 1, 1, 1).astype(np.float32))
      continue
    shape = structures[field[0]].shapes[field[1]]
    center = phantom.world_position(anat, shape.center.reshape(3, 1))[:, 0]
    d = x - center.reshape(3, 1, 1, 1).astype(np.float32)
    sigma = WINDOW * shape.axes * anat.scale
    q2 = sum(((d[0] * shape.rotation[0, k] + d[1] * shape.rotation[1, k]
               + d[2] * shape.rotation[2, k]) / sigma[k]) ** 2 for k in range(3))
    basis[j] = np.exp(-0.5 * q2) * d
  return basis


def integrate(velocity: np.ndarray, years: float, grid: CoarseGrid) -> np.ndarray:
  """Displacement (mm, coarse grid) of exp(years * velocity) by scaling and squaring.

  The number of squarings keeps the initial step below 0.2 coarse voxels (at least 2).
  """
  d = velocity * np.float32(years)
  peak = float(np.abs(d).max()) / grid.spacing_mm
  steps = max(2, int(math.ceil(math.log2(max(peak, 1e-9) / 0.2))) + 1)
  d = d / np.float32(2 ** steps)
  index = np.indices(d.shape[1:], dtype=np.float32)
  for _ in range(steps):
    d = d + sample_linear(d, index + d / np.float32(grid.spacing_mm))
  return d


def sample_linear(field: np.ndarray, where: np.ndarray) -> np.ndarray:
  """Trilinear samples of `field` [C, x, y, z] at voxel positions `where` [3, ...] (edge clamp)."""
  return np.stack([ndimage.map_coordinates(c, where, order=1, mode='nearest') for c in field])


def upsample(field: np.ndarray, grid: CoarseGrid) -> np.ndarray:
  """Separable linear interpolation of a coarse `[C, ...]` field onto the image grid."""
  if grid.factor == 1:
    return field
  for axis, n in enumerate(grid.full_shape, start=1):
    position = np.arange(n, dtype=np.float64) / grid.factor
    lower = np.minimum(position.astype(int), field.shape[axis] - 2)
    weight = (position - lower).astype(np.float32)
    shape = [1] * field.ndim
    shape[axis] = n
    weight = weight.reshape(shape)
    field = (np.take(field, lower, axis=axis) * (1 - weight)
             + np.take(field, lower + 1, axis=axis) * weight)
  return field


def jacobian_determinant(displacement: np.ndarray, voxel_mm: float) -> np.ndarray:
  """det(I + grad u) of a displacement `[3, x, y, z]` (mm) by central differences."""
  grad = np.stack([np.stack(np.gradient(displacement[i], voxel_mm), 0) for i in range(3)], 0)
  jac = grad.transpose(2, 3, 4, 0, 1) + np.eye(3, dtype=grad.dtype)
  return np.linalg.det(jac)
