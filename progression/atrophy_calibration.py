"""Calibrates a subject's known atrophy deformation so its label volumes follow target rates.

The simulator (`progression.synthetic`) deforms each subject's phantom by a stationary
velocity field, a sum of unit fields (`phantom_atrophy.velocity_basis`: whole brain, each
hippocampus, amygdala and lateral ventricle). `calibrate_followups` finds the coefficients by
Newton steps on the volumes *measured on the rendered follow-up label maps* (log-linear least
squares over the visits), with the first-order gain matrix (mean divergence of each field
over each region), until every controlled region is within about one voxel of its target at
the last visit (at most `MAX_NEWTON_STEPS`), and returns the rendered follow-ups.
"""

import math

import numpy as np

from progression import labels as L
from progression import phantom
from progression import phantom_atrophy

# Controlled targets: (region whose rate applies, label ids measured, velocity field).
_TARGETS = (
    ('whole_brain', L.REGIONS['whole_brain'], None),
    ('hippocampus', (L.LEFT_HIPPOCAMPUS,), ('hippocampus', 0)),
    ('hippocampus', (L.RIGHT_HIPPOCAMPUS,), ('hippocampus', 1)),
    ('amygdala', (L.LEFT_AMYGDALA,), ('amygdala', 0)),
    ('amygdala', (L.RIGHT_AMYGDALA,), ('amygdala', 1)),
    ('lateral_ventricles', (L.LEFT_LATERAL_VENTRICLE,), ('lateral_ventricle', 0)),
    ('lateral_ventricles', (L.RIGHT_LATERAL_VENTRICLE,), ('lateral_ventricle', 1)),
)
MAX_NEWTON_STEPS = 3

def _target_counts(labels: np.ndarray) -> np.ndarray:
  """Voxel counts of each controlled target (`_TARGETS`) in a label map."""
  per_id = L.id_counts(labels)
  return np.array([per_id[list(ids)].sum() for _, ids, _ in _TARGETS], dtype=np.float64)


def _gain_matrix(basis: np.ndarray, grid: phantom_atrophy.CoarseGrid,
                 labels: np.ndarray) -> np.ndarray:
  """d log(volume_k) / dt per unit coefficient j at t = 0: mean divergence of field j on k.

  The divergence (1/year) is taken on the coarse grid at the point nearest each voxel of k.
  """
  div = sum(np.gradient(basis[:, i], grid.spacing_mm, axis=i + 1) for i in range(3))
  gain = np.zeros((len(_TARGETS), len(basis)))
  for k, (_, ids, _) in enumerate(_TARGETS):
    voxels = np.nonzero(np.isin(labels, ids))
    if len(voxels[0]):
      nearest = tuple(np.rint(v / grid.factor).astype(np.intp) for v in voxels)
      gain[k] = div[(slice(None),) + nearest].mean(axis=1)
  return gain


def _pullbacks(coefficients, basis, grid, years: list[float]) -> list[np.ndarray]:
  """Coarse displacements (mm) of phi_t^-1 = exp(-t v) for each follow-up time t (years).

  A time that is the previous one plus the first is composed from those two maps
  (phi_{t+t1}^-1 = phi_t^-1 o phi_t1^-1, as the stationary field implies); others are
  integrated.
  """
  velocity = sum(np.float32(c) * b for c, b in zip(coefficients, basis))
  index = np.indices(basis.shape[2:], dtype=np.float32)
  maps = []
  for k, t in enumerate(years):
    if k and abs(t - years[k - 1] - years[0]) < 1e-9:
      first = maps[0]
      maps.append(first + phantom_atrophy.sample_linear(maps[-1], index + first / grid.spacing_mm))
    else:
      maps.append(phantom_atrophy.integrate(velocity, -t, grid))
  return maps


def _render_followups(anat, coefficients, basis, grid, world, years, voxel_mm, with_intensity):
  """Per follow-up: (labels, intensities or None, displacement mm, anatomical coordinates)."""
  followups = []
  for coarse in _pullbacks(coefficients, basis, grid, years):
    displacement = phantom_atrophy.upsample(coarse, grid)
    r = phantom.anatomical_coordinates(anat, world + displacement)
    followups.append(phantom.render(anat, r, voxel_mm, with_intensity) + (displacement, r))
  return followups


def calibrate_followups(anat: phantom.Anatomy, world: np.ndarray, voxel_mm: float,
                        baseline_labels: np.ndarray, years: list[float],
                        rates: dict) -> list[tuple]:
  """Renders the follow-ups with velocity coefficients fitted so volumes follow `rates`.

  Newton iterations on the log-linear least-squares annual change of each controlled region
  (measured on rendered label maps), with the first-order gain matrix; stops when every
  region is within ~1 voxel of its target at the last visit, else keeps the best of
  `MAX_NEWTON_STEPS`.

  Returns:
    per follow-up: (labels, intensities or None, displacement mm `[3,x,y,z]`, anatomical
    coordinates `[3,x,y,z]`).
  """
  grid = phantom_atrophy.coarse_grid(baseline_labels.shape, voxel_mm)
  basis = phantom_atrophy.velocity_basis(anat, grid, [f for _, _, f in _TARGETS])
  gain = _gain_matrix(basis, grid, baseline_labels)
  counts0 = _target_counts(baseline_labels)
  active = np.flatnonzero(counts0 > 0)
  times = np.asarray(years, dtype=np.float64)
  target = np.array([math.log1p(rates[region] / 100.0) for region, _, _ in _TARGETS])
  tolerance = 1.0 * times.max() / (times @ times) / np.maximum(counts0, 1.0)
  coefficients = np.zeros(len(_TARGETS))
  step = np.linalg.lstsq(gain[np.ix_(active, active)], target[active], rcond=None)[0]
  best = None
  for iteration in range(MAX_NEWTON_STEPS):
    coefficients[active] += step
    last = iteration == MAX_NEWTON_STEPS - 1  # Render intensities now: likely the keeper.
    followups = _render_followups(anat, coefficients, basis, grid, world, years, voxel_mm, last)
    counts = np.stack([_target_counts(f[0]) for f in followups])
    measured = times @ np.log(np.maximum(counts, 0.5) / np.maximum(counts0, 1.0)) / (
        times @ times)
    error = (target - measured)[active]
    score = float(np.sqrt(np.mean((error / tolerance[active]) ** 2)))
    if best is None or score < best[0]:
      best = (score, followups)
    if np.all(np.abs(error) <= tolerance[active]):
      break
    step = np.linalg.lstsq(gain[np.ix_(active, active)], error, rcond=None)[0]
  return best[1]
