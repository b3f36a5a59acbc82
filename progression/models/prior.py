"""Prior velocity field: realises a regional model's predicted rates on the baseline label map.

The generator's velocity is this field plus a learned residual (DESIGN.md, "Prior knowledge"),
so an untrained generator forecasts the regional model's volumes. For each sub-region j
(left/right hippocampus, amygdala, lateral ventricle, thalamus; the whole brain, cortex,
cerebral WM and CSF) a radial field

    b_j(x) = w_j(x) (x - c_j)     (model-grid voxels; c_j: the sub-region's centroid)

has a window w_j = clip(2 blur(mask_j), 0, 1) on the velocity grid: flat (= 1) over the
sub-region, so its divergence there is exactly 3 and the sub-region's volume changes by the
same factor at every interval (log change linear in t, no second-order drift), falling to 0
about two velocity voxels outside. The model's displacement is a pull-back, so a region R
changes by  log(V_t / V_0) ~= -t mean_R div(v)  (first order of the push-forward's Jacobian,
computed with the generator's own upsampling and central differences), and the
coefficients solve  G c = y  (weighted least squares) with G[k, j] = -mean_{R_k} div(upsample(b_j)) and y_k the
predicted annual log change of sub-region k's region (a small ridge keeps absent regions at 0).

Without label maps the same construction runs on the tissue model's classes (brain, CSF,
GM, WM: `tissue_prior_regions`) with a regional model fitted on tissue volumes.

Arrays: classes `[B, X, Y, Z]` (indices into `labels.CLASS_IDS`, or tissue classes), log
rates `[B, K]` (1/year, order of `PriorRegions.rate_regions`), velocity `[B, X/f, Y/f, Z/f, 3]`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from progression import labels
from progression.models import warp

Array = jax.Array
# Regions the prior controls, as (rate region, sub-regions of label ids, weight). The
# regional model predicts each region on its own, so its rates need not add up (whole brain
# contains cortex, WM and the deep structures); where they disagree the least-squares solve
# favours the headline measures (weight >= 1) over the others, and whole brain, the one
# equation the others' disagreement lands on, most. On the standard experiment (6 test
# subjects, 2-year forecasts; mean |deviation| from the regional model's change) whole brain
# is 0.04 % off at weight 4 (0.13 % at 2, 0.38 % at 1; at 2 its test MAE was 0.24 % above
# the regional model's), cortex 1.5 % (1.0 at 1), cerebral WM 0.9 % (0.6), thalamus 0.8 %
# (0.5); hippocampus, amygdala and ventricles within 0.05 %.
_WHOLE_BRAIN = 4.0
_SECONDARY = 0.5
_SUBREGIONS = (
    ('hippocampus', ((labels.LEFT_HIPPOCAMPUS,), (labels.RIGHT_HIPPOCAMPUS,)), 1.0),
    ('amygdala', ((labels.LEFT_AMYGDALA,), (labels.RIGHT_AMYGDALA,)), 1.0),
    ('lateral_ventricles', ((labels.LEFT_LATERAL_VENTRICLE,),
                            (labels.RIGHT_LATERAL_VENTRICLE,)), 1.0),
    ('whole_brain', (tuple(labels.REGIONS['whole_brain']),), _WHOLE_BRAIN),
    ('thalamus', ((labels.LEFT_THALAMUS,), (labels.RIGHT_THALAMUS,)), _SECONDARY),
    ('cortex', (tuple(labels.REGIONS['cortex']),), _SECONDARY),
    ('cerebral_wm', (tuple(labels.REGIONS['cerebral_wm']),), _SECONDARY),
    ('csf', (tuple(labels.REGIONS['csf']),), _SECONDARY),
)
RATE_REGIONS = tuple(name for name, _, _ in _SUBREGIONS)
# Without label maps: the tissue model's classes (`tissue.segment_tissue`: 1 CSF, 2 GM, 3 WM)
# and regions (`baselines.TISSUE_REGIONS`), brain and CSF first.
_TISSUE_SUBREGIONS = (
    ('brain', ((2, 3),), 1.0),
    ('csf', ((1,),), 1.0),
    ('gray_matter', ((2,),), _SECONDARY),
    ('white_matter', ((3,),), _SECONDARY),
)
TISSUE_RATE_REGIONS = tuple(name for name, _, _ in _TISSUE_SUBREGIONS)
SOURCES = ('labels', 'tissue')  # What the prior's class maps come from (a volume method).
_RIDGE = 1e-4  # Relative to the mean squared gain.
WINDOW_GAIN = 4.0  # Window = clip(gain * blur(mask)): flat up to ~1 velocity voxel outside.


@dataclasses.dataclass(frozen=True)
class PriorRegions:
  """Sub-regions as class-index sets, each with the index of its rate in `rate_regions`.

  `weights`: one per sub-region, its equation's weight in the least-squares solve.
  """
  rate_regions: tuple[str, ...]
  subregions: tuple[tuple[int, tuple[int, ...]], ...]
  weights: tuple[float, ...]

  @property
  def headline(self) -> tuple[bool, ...]:
    """Per rate region: whether its equation weighs >= 1, so the solve can meet it (the
    secondary regions, weight < 1, take what the others' disagreement leaves: ~1 % of the
    change off for cortex and cerebral WM at 2 mm)."""
    return tuple(any(w >= 1.0 for (k, _), w in zip(self.subregions, self.weights) if k == i)
                 for i in range(len(self.rate_regions)))


def label_prior_regions() -> PriorRegions:
  """The prior's sub-regions on `labels.CLASS_IDS` class maps."""
  to_classes = lambda ids: tuple(sorted({labels.CLASS_IDS.index(i) for i in ids
                                         if i in labels.CLASS_IDS}))
  return _prior_regions(_SUBREGIONS, to_classes)


def tissue_prior_regions() -> PriorRegions:
  """The prior's sub-regions on tissue-model maps (0 background, 1 CSF, 2 GM, 3 WM)."""
  return _prior_regions(_TISSUE_SUBREGIONS, tuple)


def prior_regions(source: str) -> PriorRegions:
  """`label_prior_regions()` or `tissue_prior_regions()` for a source in `SOURCES`."""
  if source not in SOURCES:
    raise ValueError(f'prior source must be one of {SOURCES}, got {source!r}')
  return label_prior_regions() if source == 'labels' else tissue_prior_regions()


def _prior_regions(table, to_classes) -> PriorRegions:
  subregions, weights = [], []
  for k, (_, parts, weight) in enumerate(table):
    for ids in parts:
      subregions.append((k, to_classes(ids)))
      weights.append(weight)
  return PriorRegions(tuple(name for name, _, _ in table), tuple(subregions), tuple(weights))


def _blur(x: Array, sigma: float) -> Array:
  """Separable Gaussian blur of [N, x, y, z] (voxels; zero padded)."""
  radius = max(1, int(np.ceil(2.5 * sigma)))
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  taps = jnp.asarray(taps / taps.sum(), jnp.float32)
  for axis in (1, 2, 3):
    pad = [(0, 0)] * 4
    pad[axis] = (radius, radius)
    padded = jnp.pad(x, pad)
    n = x.shape[axis]
    x = sum(taps[i] * jax.lax.slice_in_dim(padded, i, i + n, axis=axis)
            for i in range(2 * radius + 1))
  return x


def _divergence(field: Array) -> Array:
  """Central-difference divergence of [B, x, y, z, 3] (the Jacobian's stencil)."""
  return sum(warp._central_diff(field[..., a], a + 1) for a in range(3))


def _one(classes: Array, log_rates: Array, years: Array, regions: PriorRegions, factor: int,
         newton_steps: int, num_squarings: int) -> Array:
  """Prior velocity of one example: classes [X, Y, Z], log_rates [K] -> [X/f, Y/f, Z/f, 3]."""
  shape = classes.shape
  coarse = tuple(n // factor for n in shape)
  masks = jnp.stack([jnp.isin(classes, jnp.asarray(ids, classes.dtype)).astype(jnp.float32)
                     if ids else jnp.zeros(shape, jnp.float32)
                     for _, ids in regions.subregions])                          # [J, X, Y, Z]
  counts = masks.sum(axis=(1, 2, 3))
  fine_index = [jnp.arange(n, dtype=jnp.float32) for n in shape]
  centroid = jnp.stack([
      (masks.sum(axis=tuple(b for b in (1, 2, 3) if b != a + 1)) * fine_index[a]).sum(-1)
      / jnp.maximum(counts, 1.0) for a in range(3)], axis=-1)                   # [J, 3] fine
  pooled = masks.reshape(len(masks), coarse[0], factor, coarse[1], factor, coarse[2],
                         factor).mean(axis=(2, 4, 6))
  window = jnp.clip(WINDOW_GAIN * _blur(pooled, 1.0), 0.0, 1.0)                # [J, x, y, z]
  # Coarse voxel i is centred on fine coordinate f i + (f - 1) / 2.
  grid = jnp.stack(jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) * factor + (factor - 1) / 2
                                  for n in coarse], indexing='ij'), axis=-1)  # [x, y, z, 3]
  basis = window[..., None] * (grid[None] - centroid[:, None, None, None, :])  # [J, x,y,z,3]
  fine = warp.upsample_field(basis, factor) if factor > 1 else basis
  divergence = _divergence(fine)                                               # [J, X, Y, Z]
  mean_over = lambda field: jnp.einsum('kxyz,...xyz->...k', masks, field) / jnp.maximum(
      counts, 1.0)
  gain = -mean_over(divergence).T                                              # [K=J, J]
  target = log_rates[jnp.asarray([k for k, _ in regions.subregions])]
  # A region absent from the map, or without a predicted rate (NaN), is left free.
  present = ((counts > 0) & jnp.isfinite(target)).astype(jnp.float32)
  target = jnp.where(jnp.isfinite(target), target, 0.0)
  gain = gain * present[:, None] * present[None, :]
  weight = jnp.asarray(regions.weights, jnp.float32) ** 2
  ridge = _RIDGE * jnp.maximum(jnp.mean(jnp.square(gain)), 1e-12) * len(present)
  solve = lambda y: jnp.linalg.solve(gain.T @ (weight[:, None] * gain)
                                     + ridge * jnp.eye(len(present)),
                                     gain.T @ (weight * y * present))
  coefficients = solve(target)
  t = jnp.maximum(years, 0.1)[None]
  for _ in range(newton_steps):  # Correct for what the first-order gain misses at `years`.
    velocity = jnp.einsum('j,jxyzc->xyzc', coefficients, basis)
    push = warp.integrate_velocity(-velocity[None], t, num_squarings, upsample_factor=factor)
    realised = jnp.log(jnp.maximum(mean_over(warp.jacobian_determinant(push)[0]), 1e-6)) / t
    coefficients = coefficients + solve(target - realised)
  return jnp.einsum('j,jxyzc->xyzc', coefficients, basis)


def prior_velocity(classes: Array, log_rates: Array, years: Array, regions: PriorRegions,
                   factor: int, newton_steps: int = 2, num_squarings: int = 7) -> Array:
  """Velocity `[B, X/f, Y/f, Z/f, 3]` (model-grid voxels / year) realising `log_rates`.

  The first-order solve is exact for small changes; `newton_steps` corrections at each
  example's interval `years` make the realised regional change match at that interval (large
  ventricular growth otherwise falls ~6 % short per year of interval), so the field is
  stationary for one horizon and re-solved per horizon by the Forecaster.

  Args:
    classes: `[B, X, Y, Z]` baseline class indices on the model grid (X divisible by f).
    log_rates: `[B, K]` predicted annual log change per `regions.rate_regions` (1/year);
      NaN for a region the regional model does not predict (left unconstrained).
    years: `[B]` interval (years) at which the regional change must be exact.
    regions: `label_prior_regions()`.
    factor: velocity grid downsize f.
  """
  if log_rates.shape[-1] != len(regions.rate_regions):
    raise ValueError(f'prior_velocity: log_rates has {log_rates.shape[-1]} rates, the prior '
                     f'needs {len(regions.rate_regions)} ({", ".join(regions.rate_regions)})')
  fn = lambda c, y, t: _one(c, y.astype(jnp.float32), t.astype(jnp.float32), regions, factor,
                            newton_steps, num_squarings)
  return jax.lax.stop_gradient(jax.vmap(fn)(classes, log_rates, jnp.asarray(years)))
