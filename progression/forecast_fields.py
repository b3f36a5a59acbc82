"""A forecast's fields on the input's own grid: sampling, warping the image and labels (jitted).

The Forecaster integrates the velocity on the model grid; these functions carry the result to
the input's voxels (`fields_on_input`) and warp the input image and label map with it
(`warp_input`). Coordinates are voxel indices; arrays follow `forecast`'s conventions.
"""

from typing import Sequence

import jax
import jax.numpy as jnp

from progression.models import warp


def fields_on_input(velocity, years, to_grid, static: tuple[int, int, tuple[int, ...]]):
  """A horizon's model-grid fields sampled at the input's voxels (jitted; runs in XLA).

  Args:
    velocity: `[x/f, y/f, z/f, 3]` model-grid voxels / year (f = downsize).
    years: scalar interval t (years).
    to_grid: 3x4 input voxel -> model-grid voxel.
    static: (num_squarings, f, input shape `(X, Y, Z)`).
  Returns:
    `[4, X, Y, Z]`: the pull-back displacement of exp(t·v) (model-grid voxels, 3 planes)
    and det Jacobian - 1 of the push-forward exp(-t·v); all 0 outside the model grid.
  """
  num_squarings, factor, shape = static
  t = jnp.reshape(years, (1,))
  flow = lambda w: warp.integrate_velocity(w[None], t, num_squarings, upsample_factor=factor)[0]
  fields = jnp.concatenate([jnp.moveaxis(flow(velocity), -1, 0),
                            warp.jacobian_determinant(flow(-velocity)[None]) - 1.0])
  index = _voxel_index(shape)
  at_grid = [sum(to_grid[a, b] * index[b] for b in range(3)) + to_grid[a, 3] for a in range(3)]
  # Zero outside the model grid, fading over one voxel: sample a zero-padded copy.
  return _sample(jnp.pad(fields, ((0, 0), (1, 1), (1, 1), (1, 1))),
                 [c + 1.0 for c in at_grid], order=1)


def warp_input(sampled, image, label_map, grid_to_input, grid_mm):
  """Warps the input (and its labels) by `fields_on_input`'s displacement (jitted).

  A separate jit on purpose: fused with the sampling above, XLA recomputes it per corner
  of the image interpolation (5x slower at 120x144x120).

  Args:
    sampled: `fields_on_input` output `[4, X, Y, Z]`.
    image, label_map: `[X, Y, Z]` input (canonical) image and int labels (or None).
    grid_to_input: 3x3 model-grid voxel vectors -> input voxel vectors.
    grid_mm: 3x3 model-grid voxel vectors -> world mm.
  Returns:
    predicted image, pull-back displacement `[X, Y, Z, 3]` (world mm), det Jacobian (1
    outside the model grid) and warped labels (`_warp_labels`; or None).
  """
  index = _voxel_index(image.shape)
  shift = jnp.einsum('ab,b...->a...', grid_to_input, sampled[:3])
  source = [index[a] + shift[a] for a in range(3)]
  predicted = _sample(image[None], source, order=1)[0]
  labels = None if label_map is None else _warp_labels(label_map, source)
  displacement_mm = jnp.einsum('ab,b...->...a', grid_mm, sampled[:3])
  return predicted, displacement_mm, 1.0 + sampled[3], labels


# R3 low-discrepancy constants 1/g, 1/g^2, 1/g^3 (g: the plastic number's 3D root), as the
# phantom's label dither (`phantom.label_threshold`).
_R3 = tuple(1.2207440846057596 ** -p for p in (1, 2, 3))


def _warp_labels(label_map, source):
  """The label map warped through its linearly interpolated one-hot probabilities (jitted).

  The warped probability of label L at a voxel is the trilinear interpolation of the one-hot
  map of L at the voxel's source position, i.e. the summed weight of the 8 surrounding
  voxels that carry L. Taking the arg-max of those probabilities (or the nearest neighbour)
  changes a voxel only once a boundary has moved past its centre: atrophy of a few % moves
  boundaries by a fraction of a voxel, so the label map showed no change at all. Instead the
  label is drawn from those probabilities by a fixed low-discrepancy dither u(x) in [0, 1)
  (the R3 sequence over voxel indices): corner k of the 8 (fixed order) is taken when the
  cumulative weight of corners 0..k first exceeds u(x). So the expected voxel count of each
  label is its warped probability mass, which follows the Jacobian-integrated volume, and
  neighbouring boundary voxels flip at evenly spread displacements instead of together. An
  unmoved voxel (all weight on one corner) keeps its label; so does every voxel at 0 years.
  Memory is that of one trilinear sample: no array per label.

  Args:
    label_map: `[X, Y, Z]` int labels.
    source: 3 arrays `[X, Y, Z]`: fractional source voxel coordinates (pull-back).
  Returns:
    `[X, Y, Z]` warped labels (label_map's dtype).
  """
  shape = label_map.shape
  index = _voxel_index(shape)
  dither = (0.5 + sum(c * i for c, i in zip(_R3, index))) % 1.0
  flat = label_map.reshape(-1)
  corners, weights = _trilinear_corners(source, shape)
  threshold = dither * sum(weights)  # the weights sum to 1 up to rounding
  cumulative = 0.0
  chosen, taken = None, None
  for corner, weight in zip(corners, weights):
    cumulative = cumulative + weight
    value = jnp.take(flat, corner)
    if chosen is None:
      chosen, taken = value, threshold < cumulative
    else:  # Corners after the first one whose cumulative weight passes the threshold.
      chosen = jnp.where(taken, chosen, value)
      taken = taken | (threshold < cumulative)
  return chosen


def _voxel_index(shape: Sequence[int]) -> list[jax.Array]:
  """Voxel indices along each axis, broadcastable to `shape` (float32)."""
  return [jnp.arange(n, dtype=jnp.float32).reshape([-1 if a == b else 1 for b in range(3)])
          for a, n in enumerate(shape)]


def _trilinear_corners(coords: Sequence[jax.Array], sizes: Sequence[int]
                       ) -> tuple[list[jax.Array], list[jax.Array]]:
  """Flat indices and trilinear weights of the 8 voxels around fractional coordinates.

  Coordinates clamp to the grid (edge values). Corners come in the order (i, j, k) =
  (0, 0, 0), (0, 0, 1), ..., (1, 1, 1) of offsets along x, y, z.
  """
  lower, fraction = [], []
  for c, n in zip(coords, sizes):
    c = jnp.clip(c, 0, n - 1)
    c0 = jnp.minimum(jnp.floor(c), n - 2)
    lower.append(c0.astype(jnp.int32))
    fraction.append(c - c0)
  base = (lower[0] * sizes[1] + lower[1]) * sizes[2] + lower[2]
  corners, weights = [], []
  for i, j, k in ((i, j, k) for i in (0, 1) for j in (0, 1) for k in (0, 1)):
    weights.append((fraction[0] if i else 1 - fraction[0])
                   * (fraction[1] if j else 1 - fraction[1])
                   * (fraction[2] if k else 1 - fraction[2]))
    corners.append(base + (i * sizes[1] + j) * sizes[2] + k)
  return corners, weights


def _sample(values: jax.Array, coords: Sequence[jax.Array], order: int) -> jax.Array:
  """values `[C, nx, ny, nz]` at fractional voxel coordinates (3 arrays of one shape).

  order 1: trilinear, order 0: nearest; coordinates clamp to the grid (edge values).
  """
  sizes = values.shape[1:]
  flat = values.reshape(values.shape[0], -1)
  if order == 0:
    near = [jnp.clip(jnp.round(c), 0, n - 1).astype(jnp.int32) for c, n in zip(coords, sizes)]
    return jnp.take(flat, (near[0] * sizes[1] + near[1]) * sizes[2] + near[2], axis=1)
  corners, weights = _trilinear_corners(coords, sizes)
  out = 0.0
  for corner, weight in zip(corners, weights):
    out = out + weight * jnp.take(flat, corner, axis=1)
  return out
