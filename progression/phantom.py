"""Procedural brain phantom: anatomy in world mm, labels, T1-like images, atrophy fields.

The anatomy is defined in *reference millimetres* for an adult head (scalp 164 x 200 x 154 mm,
brain ~132 x 164 x 120 mm, ~1150 mL of brain tissue) and placed in the field of view at real
size times the subject's head-size factor: `world_mm = scale * reference_mm`. A field of view
too small to hold the head (e.g. the 32^3 x 4 mm grids of quick tests) shrinks every head
by one factor (an average head's semi-axes at most 97 % of the half field of view), keeping
head-size differences and roughly real proportions:
hippocampi ~0.6 % of the brain, lateral ventricles ~1.5-3 %, extracerebral CSF ~25 % of
the intracranial volume. A 2 mm grid of 96 x 112 x 96 voxels holds an adult head at real
size. Shapes are analytic functions of world coordinates, so the same subject at another
resolution with the same field of view is the same anatomy.

Structures are (bent, rotated) ellipsoids painted in order (later wins): CSF 24 inside the
skull, cortex ribbon 3/42 of gyrally varying thickness (with an interhemispheric fissure),
cerebral WM 2/41, brainstem 16, thalami 10/49, hippocampi 17/53, amygdalae 18/54, inferior
lateral ventricles 5/44, lateral ventricles 4/43. Skull and scalp carry label 0. Left/right
ids follow the sign of the anatomical x coordinate (RAS+: x > 0 is the subject's right).

Per-subject variation: head size, a smooth random low-frequency displacement of the whole
anatomy (`Anatomy.warp_*`), jittered structure positions and sizes, the structure volumes
and cortical thickness given by `AnatomyFactors` (which `progression.disease_model` draws
from the subject's disease stage and age), gyral pattern, tissue contrast. Intensities get
partial-volume anti-aliasing (a linear ramp one voxel wide across each surface). Labels of
the large tissues use a fixed sub-voxel dither (`label_threshold`); each deep structure gets
exactly round(sum of its visible partial volumes) voxels (`_count_exact`), so its label
count follows its continuous volume to half a voxel, visit after visit. `bias_field` and
`rician` add scanner effects. The atrophy deformation primitives (velocity fields on a
coarse grid, scaling and squaring, upsampling, Jacobians) are in `phantom_atrophy`.

Coordinate and displacement arrays are component-first, `[3, x, y, z]` (mm), so each
component is contiguous; label and image arrays are `[x, y, z]` in RAS+ voxel order.
"""

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from progression import labels as L

# Reference semi-axes (mm) of the nested shells, all centred at the origin.
HEAD_AXES = (82.0, 100.0, 77.0)
SKULL_AXES = (77.0, 95.0, 72.0)
ICV_AXES = (71.0, 89.0, 66.0)
BRAIN_AXES = (66.0, 82.0, 60.0)
FIT_MARGIN = 0.97  # Largest semi-axis of an average head / half field of view, at most.
CORTEX_THICKNESS = 10.5  # Mean ribbon thickness (reference mm; folded cortex as a thick ribbon).
FISSURE_HALF_WIDTH = 2.5
# Relative T1 intensities (WM = 1).
INTENSITY = {'scalp': 0.75, 'skull': 0.10, 'csf': 0.20, 'gm': 0.60, 'wm': 1.00,
             'brainstem': 0.88, 'thalamus': 0.78, 'hippocampus': 0.62, 'amygdala': 0.63,
             'ventricle': 0.18}
SCANNER_UNITS = 1000.0  # Mean WM intensity of a rendered image.

# Deep structures of the right hemisphere (mirrored for the left), painted in this order:
# name -> (left id, right id, centre, semi-axes, (yaw, pitch) degrees, bend 1/mm, intensity).
_DEEP = (
    ('thalamus', L.LEFT_THALAMUS, L.RIGHT_THALAMUS, (10., -12., 2.), (8., 14., 9.), (15., 0.),
     0.0, 'thalamus'),
    ('hippocampus', L.LEFT_HIPPOCAMPUS, L.RIGHT_HIPPOCAMPUS, (27., -20., -14.), (6.5, 19., 7.5),
     (12., 25.), 0.0, 'hippocampus'),
    ('amygdala', L.LEFT_AMYGDALA, L.RIGHT_AMYGDALA, (25., 5., -18.), (7.5, 7.5, 7.), (0., 0.),
     0.0, 'amygdala'),
    ('inferior_lateral_ventricle', L.LEFT_INF_LAT_VENTRICLE, L.RIGHT_INF_LAT_VENTRICLE,
     (32., -19., -7.), (2.5, 15., 2.5), (12., 25.), 0.0, 'ventricle'),
    ('lateral_ventricle', L.LEFT_LATERAL_VENTRICLE, L.RIGHT_LATERAL_VENTRICLE, (11., -2., 18.),
     (6.5, 34., 8.), (-5., 0.), 0.008, 'ventricle'),
)
DEEP_NAMES = tuple(d[0] for d in _DEEP)
_BRAINSTEM = ((0., -24., -42.), (12., 14., 32.), (0., 15.))


@dataclasses.dataclass(frozen=True)
class Ellipsoid:
  """A solid ellipsoid in reference mm: centre, semi-axes, rotation (columns = local axes).

  `bend` curves it: the local z is shifted by -bend * (local y)^2 (a banana, e.g. a ventricle).
  """
  center: np.ndarray
  axes: np.ndarray
  rotation: np.ndarray
  bend: float = 0.0

  def mirrored(self) -> 'Ellipsoid':
    """The left/right mirror image (x -> -x)."""
    flip = np.diag([-1.0, 1.0, 1.0])
    return Ellipsoid(self.center * np.array([-1.0, 1.0, 1.0]), self.axes,
                     flip @ self.rotation @ flip, self.bend)


@dataclasses.dataclass(frozen=True)
class Structure:
  """A painted deep structure: ids and ellipsoids for the (left, right) sides."""
  name: str
  ids: tuple[int, int]
  shapes: tuple[Ellipsoid, Ellipsoid]
  intensity: float


@dataclasses.dataclass(frozen=True)
class Anatomy:
  """One subject's phantom. Lengths in reference mm unless stated.

  Attributes:
    scale: world mm per reference mm (field of view and head size).
    warp_k, warp_amp, warp_phase: smooth displacement u(p) = sum_k amp_k sin(k_k . p + phase_k)
      ([K, 3] wave vectors in 1/mm, [K, 3] amplitudes in mm, [K] phases); anatomical
      coordinates are r = p + u(p) with p = world_mm / scale.
    brain, brainstem: ellipsoids; head, skull and intracranial shells are scaled by `shell`.
    shell: per-axis factor on the head/skull/intracranial semi-axes (head shape).
    cortex_thickness: mean ribbon thickness; gyri: (wave number 1/mm, relative amplitude,
      three phases) of the thickness modulation.
    deep: painted structures in order.
    contrast: tissue name -> intensity relative to WM; gain: scanner units of WM.
  """
  scale: float
  warp_k: np.ndarray
  warp_amp: np.ndarray
  warp_phase: np.ndarray
  shell: np.ndarray
  brain: Ellipsoid
  brainstem: Ellipsoid
  cortex_thickness: float
  gyri: tuple[float, float, float, float, float]
  deep: tuple[Structure, ...]
  contrast: dict
  gain: float


def grid_affine(shape: tuple[int, int, int], voxel_mm: float) -> np.ndarray:
  """RAS+ voxel -> world (mm) affine with isotropic `voxel_mm` voxels, grid centre at (0,0,0)."""
  affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
  affine[:3, 3] = -0.5 * (np.asarray(shape, dtype=np.float64) - 1.0) * voxel_mm
  return affine


def world_grid(shape: tuple[int, int, int], voxel_mm: float) -> np.ndarray:
  """World coordinates (mm) of every voxel centre, `[3, x, y, z]` float32 (component first)."""
  axes = [(np.arange(n) - 0.5 * (n - 1)) * voxel_mm for n in shape]
  return np.stack(np.meshgrid(*axes, indexing='ij'), axis=0).astype(np.float32)


def _rotation(yaw_deg: float, pitch_deg: float) -> np.ndarray:
  """Local y axis turned toward +x by `yaw` and its +y end lowered by `pitch` (degrees)."""
  yaw, pitch = np.deg2rad(yaw_deg), np.deg2rad(pitch_deg)
  rz = np.array([[np.cos(yaw), np.sin(yaw), 0], [-np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
  rx = np.array([[1, 0, 0], [0, np.cos(pitch), np.sin(pitch)], [0, -np.sin(pitch), np.cos(pitch)]])
  return rz @ rx


@dataclasses.dataclass(frozen=True)
class AnatomyFactors:
  """Baseline size factors of one subject relative to a healthy brain of the same head size.

  Volume factors (multiplying the reference volume) of each deep structure; `brain`: linear
  factor of the brain's semi-axes inside a fixed skull (less brain, more CSF);
  `cortex_thickness`: factor of the mean cortical ribbon thickness.
  """
  hippocampus: float = 1.0
  amygdala: float = 1.0
  lateral_ventricle: float = 1.0
  inferior_lateral_ventricle: float = 1.0
  thalamus: float = 1.0
  brain: float = 1.0
  cortex_thickness: float = 1.0


def fit_scale(fov_mm: Sequence[float]) -> float:
  """World/reference scale (<= 1) at which an average head fits the field of view (mm)."""
  fov = np.broadcast_to(np.asarray(fov_mm, np.float64), (3,))
  return float(min(1.0, np.min(FIT_MARGIN * 0.5 * fov / (np.asarray(HEAD_AXES) * 1.05))))


def sample_anatomy(rng: np.random.Generator, fov_mm: Sequence[float] | float,
                   factors: AnatomyFactors = AnatomyFactors(),
                   head_scale: float = 1.0) -> Anatomy:
  """Draws one subject's anatomy.

  Args:
    rng: the subject's generator (all randomness of the shape details comes from it).
    fov_mm: field of view (mm), per axis or one number; a head that does not fit is shrunk.
    factors: structure sizes (`AnatomyFactors`, e.g. from `disease_model.draw_baseline`).
    head_scale: the subject's head size relative to the reference adult head.
  """
  scale = head_scale * fit_scale(fov_mm)
  n_modes = 4
  direction = rng.normal(size=(n_modes, 3))
  direction /= np.linalg.norm(direction, axis=1, keepdims=True)
  warp_k = direction * (2 * np.pi / rng.uniform(90.0, 160.0, size=(n_modes, 1)))
  warp_amp = rng.normal(0.0, 1.2, size=(n_modes, 3))
  warp_phase = rng.uniform(0, 2 * np.pi, size=n_modes)
  shell = np.clip(rng.normal(1.0, 0.02, size=3), 0.95, 1.05)
  brain_factor = float(np.clip(factors.brain, 0.85, 1.03))
  brain = Ellipsoid(np.zeros(3), np.asarray(BRAIN_AXES) * shell * brain_factor, np.eye(3))
  c, a, (yaw, pitch) = _BRAINSTEM
  brainstem = Ellipsoid(np.asarray(c), np.asarray(a), _rotation(yaw, pitch))
  deep = []
  for name, left_id, right_id, center, axes, (yaw, pitch), bend, tissue in _DEEP:
    shapes = []
    for _ in range(2):  # left, right: independent jitter
      size = max(getattr(factors, name), 0.3) ** (1 / 3) * np.exp(rng.normal(0, 0.03, size=3))
      jitter = rng.normal(0, 1.0, size=3)
      rot = _rotation(yaw + rng.normal(0, 3.0), pitch + rng.normal(0, 3.0))
      shapes.append(Ellipsoid(np.asarray(center) + jitter, np.asarray(axes) * size, rot, bend))
    shapes[0] = shapes[0].mirrored()
    deep.append(Structure(name, (left_id, right_id), tuple(shapes), tissue))

  thickness = CORTEX_THICKNESS * factors.cortex_thickness
  gyri = (2 * np.pi / rng.uniform(26.0, 34.0), 0.4, *rng.uniform(0, 2 * np.pi, size=3))
  contrast = {k: v * float(np.exp(rng.normal(0, 0.02))) for k, v in INTENSITY.items()}
  contrast['wm'] = 1.0
  gain = SCANNER_UNITS * float(np.exp(rng.normal(0, 0.05)))
  return Anatomy(scale, warp_k, warp_amp, warp_phase, shell, brain, brainstem, thickness,
                 tuple(float(g) for g in gyri), tuple(deep), contrast, gain)


def warp_offset(anat: Anatomy, p: np.ndarray) -> np.ndarray:
  """The smooth shape displacement u(p) (reference mm) at reference positions `p` [3, ...]."""
  u = np.zeros(p.shape, dtype=p.dtype)
  for k, amp, phase in zip(anat.warp_k.tolist(), anat.warp_amp.tolist(),
                           anat.warp_phase.tolist()):
    s = np.sin(p[0] * k[0] + p[1] * k[1] + p[2] * k[2] + phase)
    for i in range(3):
      u[i] += amp[i] * s
  return u


def anatomical_coordinates(anat: Anatomy, world_mm: np.ndarray) -> np.ndarray:
  """Maps world positions (mm, `[3, ...]`) to the subject's anatomical reference frame (mm)."""
  p = (np.asarray(world_mm, dtype=np.float32) / np.float32(anat.scale))
  return p + warp_offset(anat, p)


def world_position(anat: Anatomy, reference_mm: np.ndarray) -> np.ndarray:
  """Approximate inverse of `anatomical_coordinates` for points `[3, ...]` (fixed point, mm)."""
  r = np.asarray(reference_mm, dtype=np.float64)
  p = r.copy()
  for _ in range(4):
    p = r - warp_offset(anat, p).astype(np.float64)
  return p * anat.scale


def _ellipsoid_sdf(r: np.ndarray, e: Ellipsoid) -> np.ndarray:
  """Approximate signed distance (mm, negative inside) to an ellipsoid: (rho - 1) / |grad rho|."""
  q = [r[i] - np.float32(e.center[i]) if e.center[i] else r[i] for i in range(3)]
  if not np.array_equal(e.rotation, np.eye(3)):
    q = [q[0] * np.float32(e.rotation[0, j]) + q[1] * np.float32(e.rotation[1, j])
         + q[2] * np.float32(e.rotation[2, j]) for j in range(3)]
  if e.bend:
    q[2] = q[2] + np.float32(e.bend) * q[1] * q[1]
  rho2 = sum((q[j] / np.float32(e.axes[j])) ** 2 for j in range(3))
  rho = np.sqrt(rho2)
  grad = np.sqrt(sum((q[j] / np.float32(e.axes[j] ** 2)) ** 2 for j in range(3)))
  grad = np.maximum(grad / np.maximum(rho, np.float32(1e-6)), np.float32(1.0 / max(e.axes)))
  return (rho - 1.0) / grad


def _scaled(e: Ellipsoid, axes: tuple[float, float, float], shell: np.ndarray) -> Ellipsoid:
  return Ellipsoid(e.center, np.asarray(axes) * shell, e.rotation)


def _bbox(r: np.ndarray, e: Ellipsoid, margin: float, stride: int) -> tuple[slice, ...] | None:
  """Index box of the grid `r` [3, x, y, z] that can hold ellipsoid `e` (+ margin mm)."""
  sub = r[:, ::stride, ::stride, ::stride]
  reach = float(max(e.axes)) * (1.0 + abs(e.bend) * max(e.axes)) + margin
  inside = sum((sub[i] - np.float32(e.center[i])) ** 2 for i in range(3)) < reach ** 2
  if not inside.any():
    return None
  box = []
  for axis in range(3):
    hit = np.nonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))[0]
    box.append(slice(max(0, (hit[0] - 1) * stride),
                     min(r.shape[axis + 1], (hit[-1] + 2) * stride)))
  return tuple(box)


def render(anat: Anatomy, r: np.ndarray, voxel_mm: float,
           with_intensity: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
  """Paints labels (and the noise-free, bias-free T1 model) at anatomical coordinates.

  Args:
    anat: the subject.
    r: `[3, x, y, z]` anatomical coordinates (reference mm) of each voxel, from
      `anatomical_coordinates` (of the grid, or of a deformed grid for a follow-up).
    voxel_mm: voxel size (world mm); sets the anti-aliasing ramp width.
    with_intensity: also render intensities (skip for label-only counting).

  Returns:
    (labels int16 `[x, y, z]`, intensities float32 `[x, y, z]` in scanner units or None).
  """
  ramp = np.float32(voxel_mm / anat.scale)
  shape = r.shape[1:]
  labels = np.zeros(shape, dtype=np.int16)
  mu = np.zeros(shape, dtype=np.float32) if with_intensity else None
  right = r[0] >= 0

  threshold = label_threshold(tuple(shape)) * ramp

  def paint(sdf, ids, tissue, box=(slice(None),) * 3):
    inside = sdf < threshold[box]
    if isinstance(ids, tuple):
      labels[box][inside] = np.where(right[box][inside], ids[1], ids[0])
    else:
      labels[box][inside] = ids
    if mu is not None:
      alpha = np.clip(0.5 - sdf / ramp, 0.0, 1.0)
      mu[box] += alpha * (np.float32(anat.contrast[tissue]) - mu[box])

  if mu is not None:
    paint(_ellipsoid_sdf(r, _scaled(anat.brain, HEAD_AXES, anat.shell)), 0, 'scalp')
    paint(_ellipsoid_sdf(r, _scaled(anat.brain, SKULL_AXES, anat.shell)), 0, 'skull')
  paint(_ellipsoid_sdf(r, _scaled(anat.brain, ICV_AXES, anat.shell)), L.CSF, 'csf')
  x, y, z = r
  brain_sdf = _ellipsoid_sdf(r, anat.brain)
  # Interhemispheric fissure: a CSF slab above the corpus callosum, deeper at the poles.
  bottom = 28.0 - 30.0 * np.clip((np.abs(y) - 30.0) / 25.0, 0.0, 1.0)
  fissure = np.maximum(np.abs(x) - FISSURE_HALF_WIDTH, bottom - z)
  hemi = np.maximum(brain_sdf, -fissure)
  paint(hemi, (L.LEFT_CORTEX, L.RIGHT_CORTEX), 'gm')
  k, amp, *phase = anat.gyri
  folds = np.sin(k * x + phase[0]) * np.sin(k * y + phase[1]) * np.sin(k * z + phase[2])
  thickness = np.float32(anat.cortex_thickness) * (1.0 + np.float32(amp) * folds)
  paint(hemi + thickness, (L.LEFT_CEREBRAL_WM, L.RIGHT_CEREBRAL_WM), 'wm')
  stride = 4
  margin = 2.0 * stride * voxel_mm / anat.scale + 2.0
  box = _bbox(r, anat.brainstem, margin, stride)  # Small structures: only inside their box.
  if box is not None:
    sdf = _ellipsoid_sdf(r[(slice(None),) + box], anat.brainstem)
    paint(np.maximum(sdf, brain_sdf[box]), L.BRAINSTEM, 'brainstem', box)
  painted = [(structure, side, shape_) for structure in anat.deep
             for side, shape_ in enumerate(structure.shapes)]
  for k, (structure, side, shape_) in enumerate(painted):
    box = _bbox(r, shape_, margin, stride)
    if box is None:
      continue
    sub = r[(slice(None),) + box]
    sdf = _ellipsoid_sdf(sub, shape_)
    later = [_ellipsoid_sdf(sub, e) for _, _, e in painted[k + 1:]]
    selected = _count_exact(sdf, later, ramp, threshold[box])
    labels[box][selected] = structure.ids[side]
    if mu is not None:
      alpha = np.clip(0.5 - sdf / ramp, 0.0, 1.0)
      mu[box] += alpha * (np.float32(anat.contrast[structure.intensity]) - mu[box])
  if mu is not None:
    mu *= np.float32(anat.gain)
  return labels, mu


def _count_exact(sdf: np.ndarray, later_sdfs: Sequence[np.ndarray], ramp: np.float32,
                 dither: np.ndarray) -> np.ndarray:
  """Voxels a structure labels: the round(V) voxels of largest visible partial volume.

  The visible partial volume of a voxel is its own ramp fraction clip(0.5 - sdf / ramp)
  times (1 - fraction) of each structure painted after it; V is their sum, in voxels. So the
  label count is the continuous visible volume to half a voxel, whatever the deformation, and
  the later structures take the voxels they cover most. Ties break by the fixed dither.
  """
  visible = np.clip(0.5 - sdf / ramp, 0.0, 1.0)
  for other in later_sdfs:
    visible *= 1.0 - np.clip(0.5 - other / ramp, 0.0, 1.0)
  count = int(round(float(visible.sum(dtype=np.float64))))
  selected = np.zeros(sdf.shape, dtype=bool)
  if count:
    key = (visible - np.float32(1e-4) * dither).ravel()
    selected.ravel()[np.argpartition(-key, count - 1)[:count]] = True
  return selected


@functools.lru_cache(maxsize=4)
def label_threshold(shape: tuple[int, int, int]) -> np.ndarray:
  """Per-voxel label threshold in (-0.5, 0.5) voxels: a fixed low-discrepancy (R3) dither.

  A voxel gets a structure's label when its signed distance is below `threshold * voxel`,
  not below 0. On average this is the same boundary, but voxels at the same depth no longer
  flip together, so label volumes follow small smooth deformations voxel by voxel instead of
  in clumps (and boundaries look like a real segmentation's, +-half a voxel).
  """
  i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing='ij',
                        sparse=True)
  g = 1.2207440846057596  # Plastic-number root for 3D: R3 sequence constants 1/g^(1..3).
  value = ((0.5 + i / g + j / g ** 2 + k / g ** 3) % 1.0 - 0.5).astype(np.float32)
  value.flags.writeable = False
  return value


def bias_field(rng: np.random.Generator, shape: tuple[int, int, int],
               strength: float = 0.08) -> np.ndarray:
  """Smooth multiplicative bias exp(quadratic polynomial), ~1 +- `strength`; float32 [x,y,z]."""
  coords = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
  x, y, z = np.meshgrid(*coords, indexing='ij', sparse=True)
  terms = (x, y, z, x * y, x * z, y * z, x * x - 0.33, y * y - 0.33, z * z - 0.33)
  coef = rng.normal(0.0, strength, size=len(terms)) * np.array([1.0] * 3 + [0.6] * 6)
  log_bias = sum(np.float32(c) * t for c, t in zip(coef, terms))
  return np.exp(np.broadcast_to(log_bias, shape)).astype(np.float32)


def rician(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
  """Magnitude of `signal` plus complex Gaussian noise of std `sigma` per channel (float32)."""
  real = signal + rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(sigma)
  imag = rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(sigma)
  return np.sqrt(real * real + imag * imag)
