"""Dense deformations on voxel grids: trilinear warping, scaling and squaring, Jacobians.

Conventions (all pure jnp functions, jit/grad/vmap-safe):
- Images `[B, x, y, z, C]`; displacements and velocities `[B, x, y, z, 3]` in VOXELS
  of their grid (component a is along spatial axis a); velocities in voxels/year.
- A displacement u defines the map phi(p) = p + u(p) (voxel coordinates).
  `warp(image, u)(p) = image(phi(p))`: the output at p is read from the input at
  p + u(p) ("pull" / backward warping). For forecasting, phi maps follow-up
  coordinates to baseline coordinates and prediction = warp(baseline, u).
- Sampling is trilinear; sample coordinates are clamped per axis to [0, n-1]
  (edge clamping: outside the grid we read the nearest edge value), and the
  gradient with respect to a clamped coordinate is zero.

Performance notes (XLA:CPU): internally fields are "planar" `[C, B, x, y, z]`
(trailing dims of size 1 or 3 vectorise badly), and `warp` has a custom VJP that
recomputes the 8 corner gathers instead of storing them and scatters the image
gradient as rows; scaling and squaring runs in `lax.scan` (an unrolled loop lets
XLA fuse each step's gathers into the next, recomputing them exponentially).
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from progression.errors import ProgressionError

Array = jax.Array
_CORNERS = tuple((i, j, k) for i in (0, 1) for j in (0, 1) for k in (0, 1))


def identity_grid(shape: Sequence[int]) -> Array:
  """Voxel coordinates of a grid: [x, y, z, 3] float32 with grid[i,j,k] = (i, j, k)."""
  axes = [jnp.arange(n, dtype=jnp.float32) for n in shape]
  return jnp.stack(jnp.meshgrid(*axes, indexing='ij'), axis=-1)


def _check_field(name: str, a: Array, channels: int | None = None) -> None:
  if a.ndim != 5 or (channels is not None and a.shape[-1] != channels):
    want = f'[batch, x, y, z, {channels if channels is not None else "C"}]'
    raise ProgressionError(f'{name} must be {want}, got shape {a.shape}')


def _planar(a: Array) -> Array:
  """[B, x, y, z, C] -> [C, B, x, y, z]."""
  return jnp.moveaxis(a, -1, 0)


def _unplanar(a: Array) -> Array:
  return jnp.moveaxis(a, 0, -1)


# ----------------------------------------------------------------------------- warp


def _corners(disp: Array):
  """Cell of each sample point. disp: planar [3, B, x, y, z] float32.

  Returns (idx, fractions, inside): idx [B,x,y,z] int32 flat index of the lower
  corner in the [B*x*y*z] flattening; fractions (fx, fy, fz) in [0, 1]; inside
  (3 bool arrays): the coordinate was not clamped (its gradient passes).
  """
  _, b, nx, ny, nz = disp.shape
  lower, fractions, inside = [], [], []
  for axis, n in enumerate((nx, ny, nz)):
    shape = [1, 1, 1, 1]
    shape[axis + 1] = n
    p = jnp.arange(n, dtype=disp.dtype).reshape(shape) + disp[axis]
    inside.append((p >= 0) & (p <= n - 1))
    p = jnp.clip(p, 0, n - 1)
    p0 = jnp.minimum(jnp.floor(p), n - 2)  # cell [p0, p0+1]; f may be 1 at the top edge
    fractions.append(p - p0)
    lower.append(p0.astype(jnp.int32))
  base = jnp.arange(b, dtype=jnp.int32).reshape(b, 1, 1, 1) * nx
  idx = ((base + lower[0]) * ny + lower[1]) * nz + lower[2]
  return idx, fractions, inside


def _offsets(ny: int, nz: int) -> list[int]:
  return [(i * ny + j) * nz + k for i, j, k in _CORNERS]


def _gather_corners(img: Array, idx: Array) -> list[Array]:
  """img planar [C, B, x, y, z]; -> 8 arrays [C, B, x, y, z] (corner order _CORNERS)."""
  c, _, _, ny, nz = img.shape
  flat = img.reshape(c, -1)
  # mode='clip' keeps NaN coordinates memory-safe (they still give NaN outputs via f).
  return [jnp.take(flat, idx + o, axis=1, mode='clip') for o in _offsets(ny, nz)]


def _lerp(a: Array, b: Array, t: Array) -> Array:
  # (1-t)*a + t*b is exact at t=0 and t=1 (a + t*(b-a) is not).
  return (1 - t) * a + t * b


def _trilinear(v: list[Array], fx: Array, fy: Array, fz: Array) -> Array:
  x = [_lerp(v[n], v[4 + n], fx) for n in range(4)]   # over i; x[(j,k)]
  y = [_lerp(x[n], x[2 + n], fy) for n in range(2)]   # over j; y[k]
  return _lerp(y[0], y[1], fz)


@jax.custom_vjp
def _warp_planar(img: Array, disp: Array) -> Array:
  """img [C, B, x, y, z], disp [3, B, x, y, z] -> [C, B, x, y, z]."""
  idx, (fx, fy, fz), _ = _corners(disp)
  return _trilinear(_gather_corners(img, idx), fx, fy, fz)


def _warp_planar_fwd(img, disp):
  idx, fractions, inside = _corners(disp)
  out = _trilinear(_gather_corners(img, idx), *fractions)
  return out, (img, idx, fractions, inside)


def _warp_planar_bwd(res, g):
  img, idx, (fx, fy, fz), inside = res
  c, b, nx, ny, nz = img.shape
  v = _gather_corners(img, idx)
  csum = lambda a: sum(a[ch] * g[ch] for ch in range(c))  # explicit adds: small reduces are slow
  # d out / d f_a: differences along axis a, interpolated along the other two.
  dvx = [v[4 + n] - v[n] for n in range(4)]
  dx = _lerp(_lerp(dvx[0], dvx[2], fy), _lerp(dvx[1], dvx[3], fy), fz)
  x = [_lerp(v[n], v[4 + n], fx) for n in range(4)]
  dy = _lerp(x[2] - x[0], x[3] - x[1], fz)
  y = [_lerp(x[n], x[2 + n], fy) for n in range(2)]
  dz = y[1] - y[0]
  zero = jnp.zeros((), g.dtype)
  d_disp = jnp.stack([jnp.where(inside[0], csum(dx), zero),
                      jnp.where(inside[1], csum(dy), zero),
                      jnp.where(inside[2], csum(dz), zero)])
  # d out / d img: scatter the trilinear weights times g to the 8 corners, as rows of C.
  wx, wy, wz = (1 - fx, fx), (1 - fy, fy), (1 - fz, fz)
  upd = jnp.stack([jnp.stack([g[ch] * (wx[i] * wy[j] * wz[k]) for i, j, k in _CORNERS], -1)
                   for ch in range(c)], -1).reshape(-1, 8, c)
  rows = idx.reshape(-1, 1) + jnp.asarray(_offsets(ny, nz), jnp.int32).reshape(1, 8)
  d_img = jnp.zeros((b * nx * ny * nz, c), img.dtype).at[rows].add(upd, mode='drop')
  return jnp.moveaxis(d_img, -1, 0).reshape(img.shape), d_disp


_warp_planar.defvjp(_warp_planar_fwd, _warp_planar_bwd)


def _check_warp_args(image: Array, displacement: Array) -> None:
  _check_field('image', image)
  _check_field('displacement', displacement, 3)
  if image.shape[:4] != displacement.shape[:4]:
    raise ProgressionError(
        f'image {image.shape} and displacement {displacement.shape} must share [batch, x, y, z]')
  if min(image.shape[1:4]) < 2:
    raise ProgressionError(f'warp needs at least 2 voxels per axis, got {image.shape[1:4]}')


def warp(image: Array, displacement: Array) -> Array:
  """Trilinear pull-back: out[b, p] = image[b, p + displacement[b, p]] (edge clamped).

  Args:
    image: [B, x, y, z, C] (any float dtype; computed in float32).
    displacement: [B, x, y, z, 3] in voxels.
  Returns:
    [B, x, y, z, C] float32. Differentiable in both arguments.
  """
  _check_warp_args(image, displacement)
  out = _warp_planar(_planar(image.astype(jnp.float32)), _planar(displacement.astype(jnp.float32)))
  return _unplanar(out)


def warp_label_corners(classes: Array, displacement: Array) -> tuple[Array, Array]:
  """Trilinear pull-back of a label map, kept as (corner classes, corner weights).

  The soft label that `warp_labels_onehot(one_hot(classes), displacement)` gives at p is
  sum over the 8 corners c of weights[c, p] * one_hot(corner_classes[c, p]): this form
  never builds the K-channel maps (K times less memory traffic for K classes), and losses
  can reduce it per class directly (`losses.warped_label_sums`).

  Args:
    classes: [B, x, y, z] integer class indices.
    displacement: [B, x, y, z, 3] in voxels.
  Returns:
    corner_classes [8, B, x, y, z] int32 (class at each corner of the cell read by each
    output voxel) and weights [8, B, x, y, z] float32 (trilinear weights, summing to 1;
    differentiable in `displacement`, zero gradient where a coordinate was clamped).
  """
  _check_warp_args(classes[..., None], displacement)
  idx, (fx, fy, fz), inside = _corners(_planar(displacement.astype(jnp.float32)))
  # Clamped coordinates pass no gradient (as in `warp`): stop it on their fractions.
  fx, fy, fz = [jnp.where(ok, f, lax.stop_gradient(f)) for f, ok in zip((fx, fy, fz), inside)]
  corner_classes = jnp.stack(_gather_corners(classes.astype(jnp.int32)[None], idx))[:, 0]
  wx, wy, wz = (1 - fx, fx), (1 - fy, fy), (1 - fz, fz)
  weights = jnp.stack([wx[i] * wy[j] * wz[k] for i, j, k in _CORNERS])
  return corner_classes, weights


def warp_labels_onehot(onehot: Array, displacement: Array) -> Array:
  """Warps one-hot (or soft) label maps: [B, x, y, z, K] -> soft labels, float32.

  Trilinear weights sum to one, so the output stays a probability vector per
  voxel (a partition of unity); take `argmax(-1)` for hard labels.
  """
  return warp(onehot.astype(jnp.float32), displacement)


# ------------------------------------------------------------- integration, composition


def _integrate_planar(d: Array, num_squarings: int) -> Array:
  """Scaling-and-squaring steps on a planar displacement [3, B, x, y, z]."""
  if num_squarings == 0:
    return d
  step = lambda d, _: (d + _warp_planar(d, d), None)  # phi <- phi o phi
  d, _ = lax.scan(step, d, None, length=num_squarings)
  return d


def integrate_velocity(velocity: Array, years: Array, num_squarings: int = 7,
                       upsample_factor: int = 1) -> Array:
  """Displacement of phi_t = exp(t v) for a stationary velocity, by scaling and squaring.

  d_0 = years * v / 2^N, then N times d <- d + d(x + d(x)) (phi <- phi o phi).

  Args:
    velocity: [B, x, y, z, 3] in voxels/year of the OUTPUT grid (the velocity's
      own grid when upsample_factor == 1).
    years: [B] interval in years (0 gives exactly 0; negative gives the inverse map).
    num_squarings: N; 7 keeps each step's displacement small for |v t| up to ~10 voxels.
    upsample_factor: f >= 1. The flow is integrated on the velocity's (coarse)
      grid and the displacement upsampled (`upsample_displacement`) to a grid f
      times finer, as VoxelMorph's int_downsize: 8x cheaper for f=2.
  Returns:
    displacement [B, f*x, f*y, f*z, 3] in voxels of the output grid, float32.
  """
  _check_velocity_args(velocity, years, upsample_factor)
  return _unplanar(_displacement_planar(velocity, years, num_squarings, upsample_factor))


def _check_velocity_args(velocity: Array, years: Array, upsample_factor: int) -> None:
  _check_field('velocity', velocity, 3)
  if jnp.shape(years) != velocity.shape[:1]:
    raise ProgressionError(f'years must be [batch]={velocity.shape[:1]}, got {jnp.shape(years)}')
  if min(velocity.shape[1:4]) < 2:
    raise ProgressionError(f'velocity needs at least 2 voxels per axis, got {velocity.shape[1:4]}')
  if int(upsample_factor) != upsample_factor or upsample_factor < 1:
    raise ProgressionError(f'upsample_factor must be a positive integer, got {upsample_factor}')


def _displacement_planar(velocity: Array, years: Array, num_squarings: int,
                         upsample_factor: int) -> Array:
  years = jnp.asarray(years, jnp.float32)
  scale = (years / (2.0 ** num_squarings * upsample_factor)).reshape(1, -1, 1, 1, 1)
  d = _integrate_planar(_planar(velocity.astype(jnp.float32)) * scale, num_squarings)
  if upsample_factor > 1:
    d = _upsample_planar(d, upsample_factor) * upsample_factor
  return d


def flow(image: Array, velocity: Array, years: Array, num_squarings: int = 7,
         upsample_factor: int = 1) -> tuple[Array, Array, Array]:
  """Integrates a velocity and applies it: one fused path for forecasting.

  Equivalent to d = integrate_velocity(velocity, years, num_squarings,
  upsample_factor); (d, warp(image, d), jacobian_determinant(d)), but without
  layout round trips (faster on CPU).

  Args:
    image: [B, X, Y, Z, C] on the output grid (X = f * velocity x size).
    velocity: [B, X/f, Y/f, Z/f, 3] voxels (of the output grid) per year.
    years: [B]. num_squarings, upsample_factor: as `integrate_velocity`.
  Returns:
    (displacement [B,X,Y,Z,3] voxels, warped image [B,X,Y,Z,C] float32,
     jacobian determinant [B,X,Y,Z]).
  """
  _check_velocity_args(velocity, years, upsample_factor)
  _check_field('image', image)
  want = tuple(upsample_factor * n for n in velocity.shape[1:4])
  if image.shape[0] != velocity.shape[0] or tuple(image.shape[1:4]) != want:
    raise ProgressionError(
        f'image {image.shape} must be [batch, {want}, C] for velocity {velocity.shape} and '
        f'upsample_factor {upsample_factor}')
  d = _displacement_planar(velocity, years, num_squarings, upsample_factor)
  warped = _warp_planar(_planar(image.astype(jnp.float32)), d)
  return _unplanar(d), _unplanar(warped), _jacobian_det_planar(d)


def compose(d_first: Array, d_second: Array) -> Array:
  """Displacement of phi_second o phi_first: d(x) = d_first(x) + d_second(x + d_first(x)).

  The point x is first moved by d_first, then by d_second sampled where it
  landed. For images: warp(warp(I, d_second), d_first) == warp(I, compose(d_first,
  d_second)) up to interpolation error. For one stationary velocity,
  compose(d(t1), d(t2)) = d(t1 + t2).

  Args: d_first, d_second: [B, x, y, z, 3] voxels. Returns [B, x, y, z, 3].
  """
  _check_warp_args(d_second, d_first)
  return d_first.astype(jnp.float32) + warp(d_second, d_first)


# ----------------------------------------------------------------- Jacobian, resizing


def _central_diff(a: Array, axis: int) -> Array:
  """np.gradient(a, axis=axis) with edge_order=1 (unit spacing); needs size >= 2."""
  n = a.shape[axis]
  sl = lambda s, e: lax.slice_in_dim(a, s, e, axis=axis)
  interior = (sl(2, n) - sl(0, n - 2)) * 0.5
  return jnp.concatenate([sl(1, 2) - sl(0, 1), interior, sl(n - 1, n) - sl(n - 2, n - 1)], axis)


def _central_diff_transpose(h: Array, axis: int) -> Array:
  """Adjoint of `_central_diff` along `axis` (written out: autodiff's pads are slow on CPU)."""
  n = h.shape[axis]
  sl = lambda s, e: lax.slice_in_dim(h, s, e, axis=axis)
  if n == 2:  # D = [[-1, 1], [-1, 1]]
    s = sl(0, 1) + sl(1, 2)
    return jnp.concatenate([-s, s], axis)
  # Row i of D has +c_i at column i+1 and -c_i at column i-1 (c = 1/2 inside); the
  # edge rows are one-sided: row 0 = (-1, +1, 0...), row n-1 = (..., 0, -1, +1).
  half_inner = sl(1, n - 1) * 0.5
  zero = jnp.zeros_like(sl(0, 1))
  plus = jnp.concatenate([zero, sl(0, 1), half_inner], axis)         # column j <- row j-1
  minus = jnp.concatenate([half_inner, sl(n - 1, n), zero], axis)    # column j <- row j+1
  edges = jnp.concatenate([-sl(0, 1), jnp.zeros_like(sl(2, n)), sl(n - 1, n)], axis)
  return plus - minus + edges


def _jacobian_parts(d: Array):
  # J[a][b] = delta_ab + d u_a / d x_b; u_a = d[a] ([B, x, y, z]; x_b is array axis b+1).
  return [[_central_diff(d[a], b + 1) + (1.0 if a == b else 0.0) for b in range(3)]
          for a in range(3)]


def _det3(j):
  return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
          - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
          + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))


@jax.custom_vjp
def _jacobian_det_planar(d: Array) -> Array:
  return _det3(_jacobian_parts(d))


def _jacobian_det_fwd(d):
  return _jacobian_det_planar(d), d


def _jacobian_det_bwd(d, g):
  j = _jacobian_parts(d)
  # d det / d J[a][b] = cofactor C[a][b].
  cof = [[j[(a + 1) % 3][(b + 1) % 3] * j[(a + 2) % 3][(b + 2) % 3]
          - j[(a + 1) % 3][(b + 2) % 3] * j[(a + 2) % 3][(b + 1) % 3] for b in range(3)]
         for a in range(3)]
  grads = [sum(_central_diff_transpose(g * cof[a][b], b + 1) for b in range(3)) for a in range(3)]
  return (jnp.stack(grads),)


_jacobian_det_planar.defvjp(_jacobian_det_fwd, _jacobian_det_bwd)


def jacobian_determinant(displacement: Array) -> Array:
  """det of the Jacobian of x -> x + u(x), central differences (one-sided at edges).

  Args:
    displacement: [B, x, y, z, 3] voxels (each axis >= 2 voxels).
  Returns:
    [B, x, y, z] float32; >1 local expansion, <1 shrinkage, <=0 folding. The
    integral over a region approximates its volume after the map (in voxels).
  """
  _check_field('displacement', displacement, 3)
  if min(displacement.shape[1:4]) < 2:
    raise ProgressionError(f'jacobian needs at least 2 voxels per axis, got {displacement.shape}')
  return _jacobian_det_planar(_planar(displacement.astype(jnp.float32)))


def _resize_phases(factor: int) -> list[tuple[int, float]]:
  """Per output phase r: (s, w) with out_r[i] = (1-w) ap[i+s] + w ap[i+s+1], ap edge-padded."""
  phases = []
  for r in range(factor):
    delta = (r + 0.5) / factor - 0.5  # position of phase r relative to its coarse voxel
    phases.append((0, 1.0 + delta) if delta < 0 else (1, delta))
  return phases


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _resize_axis(a: Array, axis: int, factor: int) -> Array:
  """Cell-centred linear upsampling by an integer factor along one axis, edge clamped.

  Output voxel j sits at input coordinate (j + 0.5) / factor - 0.5.
  """
  n = a.shape[axis]
  # Edge padding by concatenation (jnp.pad mode='edge' lowers to a gather).
  ap = jnp.concatenate([lax.slice_in_dim(a, 0, 1, axis=axis), a,
                        lax.slice_in_dim(a, n - 1, n, axis=axis)], axis)
  sl = lambda s: lax.slice_in_dim(ap, s, s + n, axis=axis)
  out = jnp.stack([_lerp(sl(s), sl(s + 1), w) if w else sl(s)
                   for s, w in _resize_phases(factor)], axis=axis + 1)
  shape = list(a.shape)
  shape[axis] = n * factor
  return out.reshape(shape)


def _resize_axis_fwd(a, axis, factor):
  return _resize_axis(a, axis, factor), None


def _resize_axis_bwd(axis, factor, _, g):
  # Hand-written adjoint: autodiff's transposed slices become many full-size pads.
  shape = list(g.shape)
  n = shape[axis] // factor
  gp = g.reshape(shape[:axis] + [n, factor] + shape[axis + 1:])
  shifted = [0.0, 0.0, 0.0]  # H_k: cotangent of ap[i + k]
  for r, (s, w) in enumerate(_resize_phases(factor)):
    g_r = lax.index_in_dim(gp, r, axis + 1, keepdims=False)
    shifted[s] = shifted[s] + (1 - w) * g_r
    if w:
      shifted[s + 1] = shifted[s + 1] + w * g_r
  h0, h1, h2 = [h if not isinstance(h, float) else jnp.zeros_like(g_r) for h in shifted]
  if n == 1:
    return (h0 + h1 + h2,)
  sl = lambda h, s, e: lax.slice_in_dim(h, s, e, axis=axis)
  zero = jnp.zeros_like(sl(h0, 0, 1))
  # ap[i] = a[max(i-1, 0)] for the k=0 term; ap[i+2] = a[min(i+1, n-1)] for k=2.
  lo = jnp.concatenate([sl(h0, 0, 1) + sl(h0, 1, 2), sl(h0, 2, n), zero], axis)
  hi = jnp.concatenate([zero, sl(h2, 0, n - 2), sl(h2, n - 2, n - 1) + sl(h2, n - 1, n)], axis)
  return (h1 + lo + hi,)


_resize_axis.defvjp(_resize_axis_fwd, _resize_axis_bwd)


def _upsample_planar(a: Array, factor: int) -> Array:
  for axis in (2, 3, 4):
    a = _resize_axis(a, axis, factor)
  return a


def upsample_field(field: Array, factor: int) -> Array:
  """Trilinear, cell-centred upsampling of [B, x, y, z, C] by an integer factor.

  Coarse voxel i covers fine voxels [f*i, f*i + f) (as `layers.space_to_depth`);
  values are interpolated, not rescaled (use `upsample_displacement` for
  displacements in voxels).
  """
  _check_field('field', field)
  if factor == 1:
    return field
  return _unplanar(_upsample_planar(_planar(field), factor))


def upsample_displacement(displacement: Array, factor: int) -> Array:
  """Coarse-grid displacement (coarse voxels) -> fine grid, in fine voxels (x factor)."""
  return upsample_field(displacement, factor) * factor

