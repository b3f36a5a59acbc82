"""A built-in CSF / GM / WM tissue model for T1-weighted images (no label maps needed).

So that a predicted and a real follow-up are measured by the SAME method when no label maps
exist, this module segments any T1-like `[x, y, z]` image into three tissues:

1. `brain_mask`: smoothed multi-level Otsu threshold, largest connected component, closing and
   hole filling.
2. `fit_tissue_model`: a 3-class Gaussian mixture of the intensities inside the mask, fitted by
   EM from intensity-quantile initial means; classes are ordered by mean, so for T1 contrast
   class 1 = CSF (darkest), 2 = GM, 3 = WM (brightest).
3. `tissue_probabilities` / `segment_tissue`: posteriors with a spatial smoothing prior
   ("MRF-lite"): for a few iterations, each class posterior is smoothed with a Gaussian of
   `smoothing_sigma_vox` voxels, renormalised across classes and used as the voxel's prior.

Everything is deterministic (no random initialisation). Volumes are in mL (1 mL = 1000 mm^3).
"""

import dataclasses

import numpy as np
from scipy import ndimage

from progression.errors import ProgressionError

BACKGROUND, CSF, GM, WM = 0, 1, 2, 3
CLASS_NAMES = ('csf', 'gm', 'wm')
_MIN_VOXELS = 30
_PRIOR_FLOOR = 1e-4


@dataclasses.dataclass(frozen=True)
class TissueModel:
  """Gaussian mixture of intensities, classes ordered CSF, GM, WM (ascending mean).

  Attributes:
    means: per-class mean intensity (image units).
    stds: per-class standard deviation (image units).
    weights: per-class mixing proportion (sums to 1).
  """
  means: tuple[float, float, float]
  stds: tuple[float, float, float]
  weights: tuple[float, float, float]


def brain_mask(image: np.ndarray, threshold: float | None = None,
               smoothing_sigma_vox: float = 1.0, closing_radius_vox: int = 1) -> np.ndarray:
  """Brain (foreground incl. CSF) mask of a skull-stripped T1-like image, `[x, y, z]` bool.

  The image is smoothed with a Gaussian of `smoothing_sigma_vox` voxels (suppresses noise in
  the dark background and CSF), thresholded at `threshold` (default: the lowest of three
  multi-level Otsu thresholds, which for a background/CSF/GM/WM image separates the background
  from CSF; see `otsu_thresholds`), reduced to its largest 26-connected component, closed with
  a ball of `closing_radius_vox` voxels (bridges thin dark gaps such as sulci) and hole-filled
  (ventricles). For a head image with skull and scalp, pass an explicit `threshold` or a mask.

  Args:
    image: `[x, y, z]` intensities (any unit; background near the minimum).
    threshold: intensity (image units) above which a smoothed voxel is foreground.
    smoothing_sigma_vox: pre-threshold smoothing in voxels; 0 disables it.
    closing_radius_vox: radius of the closing ball in voxels; 0 disables it.

  Raises:
    ProgressionError: for a non-3D, non-finite or constant image, or when nothing exceeds the
      threshold.
  """
  image = _check_image(image)
  smooth = ndimage.gaussian_filter(image, smoothing_sigma_vox) if smoothing_sigma_vox > 0 else image
  if threshold is None:
    threshold = otsu_thresholds(smooth, classes=4)[0]
  fg = smooth > threshold
  if not fg.any():
    raise ProgressionError(f'brain_mask: no voxel above threshold {threshold:.4g}')
  comps, n = ndimage.label(fg, structure=np.ones((3, 3, 3), bool))
  if n > 1:
    sizes = np.bincount(comps.ravel())
    sizes[0] = 0
    fg = comps == int(np.argmax(sizes))
  if closing_radius_vox > 0:
    r = int(closing_radius_vox)
    grid = np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1]
    ball = (grid ** 2).sum(axis=0) <= r * r
    # Pad so the closing is not clipped at the volume border.
    fg = ndimage.binary_closing(np.pad(fg, r), structure=ball)[r:-r, r:-r, r:-r]
  return ndimage.binary_fill_holes(fg)


def otsu_thresholds(values: np.ndarray, classes: int = 2, bins: int = 64) -> tuple[float, ...]:
  """Multi-level Otsu: the `classes - 1` thresholds maximising between-class variance.

  Exhaustive search over the edges of a `bins`-bin histogram (deterministic). `classes` is 2
  (plain Otsu), 3 or 4.

  Returns:
    Ascending thresholds in the units of `values`.
  """
  if classes not in (2, 3, 4):
    raise ProgressionError(f'otsu_thresholds: classes must be 2, 3 or 4, got {classes}')
  values = np.asarray(values, dtype=np.float64).ravel()
  lo, hi = float(values.min()), float(values.max())
  if hi <= lo:
    raise ProgressionError(f'cannot threshold a constant image (all values {lo:.4g})')
  hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
  centers = 0.5 * (edges[:-1] + edges[1:])
  cum_w = np.concatenate([[0.0], np.cumsum(hist)])
  cum_s = np.concatenate([[0.0], np.cumsum(hist * centers)])

  def term(a, b):  # sum^2 / weight of the class holding bins [a, b)
    w = cum_w[b] - cum_w[a]
    s2 = (cum_s[b] - cum_s[a]) ** 2
    return np.divide(s2, w, out=np.zeros(np.broadcast(s2, w).shape), where=w > 0)

  cuts = np.meshgrid(*[np.arange(1, bins)] * (classes - 1), indexing='ij', sparse=True)
  bounds = [0, *cuts, bins]
  score = sum(term(bounds[i], bounds[i + 1]) for i in range(classes))
  for i in range(1, classes - 1):  # strictly increasing cut points
    score = np.where(bounds[i] < bounds[i + 1], score, -np.inf)
  best = np.unravel_index(int(np.argmax(score)), score.shape)
  return tuple(float(edges[i + 1]) for i in best)  # index i <-> cut after bin i + 1


def fit_tissue_model(image: np.ndarray, mask: np.ndarray, max_iterations: int = 2000,
                     tol: float = 1e-10, bins: int = 1024) -> TissueModel:
  """Fits a 3-class Gaussian mixture to the intensities inside `mask` by EM.

  EM runs on a `bins`-bin histogram of the masked intensities (each bin centre weighted by
  its count): the same fixed point as EM on the voxels up to the bin width (range / bins),
  but each iteration costs `bins` instead of one step per voxel (a 1.5 mm brain has ~1M).
  Initial means are the 1/6, 1/2 and 5/6 intensity quantiles, initial stds a quarter of the
  inter-quantile spread, weights equal. Stds are floored at 1e-3 of the intensity range so a
  class cannot collapse. Iterates until the mean log-likelihood improves by < `tol`.

  Returns:
    `TissueModel` with classes sorted by mean (CSF, GM, WM for T1).

  Raises:
    ProgressionError: on shape mismatch, too few mask voxels, or constant intensities.
  """
  image = _check_image(image)
  mask = _check_mask(mask, image.shape)
  x = image[mask]
  lo, mid, hi = np.quantile(x, [1 / 6, 1 / 2, 5 / 6])
  spread = float(x.max() - x.min())
  if spread <= 0:
    raise ProgressionError('fit_tissue_model: intensities inside the mask are constant')
  counts, edges = np.histogram(x, bins=bins)
  keep = counts > 0
  centers = (0.5 * (edges[:-1] + edges[1:]))[keep][:, None]
  counts = counts[keep].astype(np.float64)[:, None]
  floor = 1e-3 * spread
  means = np.array([lo, mid, hi], dtype=np.float64)
  stds = np.full(3, max((hi - lo) / 4.0, floor))
  weights = np.full(3, 1.0 / 3.0)
  previous = -np.inf
  for _ in range(max_iterations):
    log_joint = np.log(weights) + _log_gauss(centers, means, stds)
    log_norm = np.logaddexp.reduce(log_joint, axis=1, keepdims=True)
    resp = counts * np.exp(log_joint - log_norm)
    nk = resp.sum(axis=0) + 1e-12
    weights = nk / nk.sum()
    means = (resp * centers).sum(axis=0) / nk
    stds = np.sqrt((resp * (centers - means) ** 2).sum(axis=0) / nk)
    stds = np.maximum(stds, floor)
    loglik = float((counts * log_norm).sum() / counts.sum())
    if loglik - previous < tol:
      break
    previous = loglik
  order = np.argsort(means, kind='stable')
  return TissueModel(means=tuple(float(v) for v in means[order]),
                     stds=tuple(float(v) for v in stds[order]),
                     weights=tuple(float(v) for v in weights[order]))


def tissue_probabilities(image: np.ndarray, mask: np.ndarray | None = None,
                         model: TissueModel | None = None, smoothing_sigma_vox: float = 1.0,
                         iterations: int = 5) -> np.ndarray:
  """Per-voxel tissue posteriors, `[x, y, z, 3]` float64 (CSF, GM, WM); zero outside the mask.

  Args:
    image: `[x, y, z]` T1-like image (any intensity unit).
    mask: `[x, y, z]` bool region to segment; default `brain_mask(image)`, which suits
      skull-stripped images only (with skull and scalp, pass a mask, e.g. labels > 0).
    model: intensity model; default `fit_tissue_model(image, mask)`.
    smoothing_sigma_vox: Gaussian sigma (voxels) of the spatial prior; 0 disables it.
    iterations: rounds of (smooth posteriors -> prior -> posterior); 0 = plain mixture.

  Returns:
    Posteriors that sum to 1 inside the mask.
  """
  image = _check_image(image)
  mask = _check_mask(brain_mask(image) if mask is None else mask, image.shape)
  if model is None:
    model = fit_tissue_model(image, mask)
  x = image[mask]
  log_lik = _log_gauss(x[:, None], np.asarray(model.means), np.asarray(model.stds))
  post = _softmax(np.log(np.asarray(model.weights)) + log_lik)
  if smoothing_sigma_vox > 0:
    for _ in range(iterations):
      prior = np.empty_like(post)
      for k in range(3):
        vol = np.zeros(image.shape)
        vol[mask] = post[:, k]
        prior[:, k] = ndimage.gaussian_filter(vol, smoothing_sigma_vox, mode='constant')[mask]
      # Renormalising across classes also divides out the mask's partial coverage at its rim.
      prior = np.maximum(prior, 0.0)
      prior /= np.maximum(prior.sum(axis=1, keepdims=True), 1e-300)
      prior = (1.0 - 3 * _PRIOR_FLOOR) * prior + _PRIOR_FLOOR
      post = _softmax(np.log(prior) + log_lik)
  out = np.zeros(image.shape + (3,))
  out[mask] = post
  return out


def segment_tissue(image: np.ndarray, mask: np.ndarray | None = None,
                   model: TissueModel | None = None, smoothing_sigma_vox: float = 1.0,
                   iterations: int = 5) -> np.ndarray:
  """Hard tissue segmentation, `[x, y, z]` int32: 0 background, 1 CSF, 2 GM, 3 WM.

  The arg-max of `tissue_probabilities` (same arguments) inside the mask.
  """
  image = _check_image(image)
  mask = _check_mask(brain_mask(image) if mask is None else mask, image.shape)
  probs = tissue_probabilities(image, mask, model, smoothing_sigma_vox, iterations)
  seg = np.zeros(image.shape, np.int32)
  seg[mask] = np.argmax(probs[mask], axis=1).astype(np.int32) + 1
  return seg


def tissue_volumes_ml(seg: np.ndarray, voxel_volume_ml: float) -> dict[str, float]:
  """Volumes of CSF, GM and WM in a `segment_tissue` map, in mL.

  Returns:
    {'csf': ..., 'gm': ..., 'wm': ...} = voxel counts of classes 1, 2, 3 times voxel_volume_ml.
  """
  seg = np.asarray(seg)
  if seg.ndim != 3:
    raise ProgressionError(f'tissue segmentation must be 3D [x, y, z], got shape {seg.shape}')
  if not np.isfinite(voxel_volume_ml) or voxel_volume_ml <= 0:
    raise ProgressionError(f'voxel_volume_ml must be positive, got {voxel_volume_ml}')
  return {name: float(np.count_nonzero(seg == k)) * float(voxel_volume_ml)
          for k, name in zip((CSF, GM, WM), CLASS_NAMES)}


def _log_gauss(x: np.ndarray, means: np.ndarray, stds: np.ndarray) -> np.ndarray:
  return -0.5 * ((x - means) / stds) ** 2 - np.log(stds) - 0.5 * np.log(2 * np.pi)


def _softmax(logits: np.ndarray) -> np.ndarray:
  logits = logits - logits.max(axis=1, keepdims=True)
  p = np.exp(logits)
  return p / p.sum(axis=1, keepdims=True)


def _check_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image, dtype=np.float64)
  if image.ndim != 3:
    raise ProgressionError(f'expected a 3D [x, y, z] image, got shape {image.shape}')
  if not np.all(np.isfinite(image)):
    raise ProgressionError('image contains NaN or infinite values')
  return image


def _check_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  mask = np.asarray(mask)
  if mask.shape != shape:
    raise ProgressionError(f'mask shape {mask.shape} does not match image shape {shape}')
  mask = mask.astype(bool)
  if np.count_nonzero(mask) < _MIN_VOXELS:
    raise ProgressionError(
        f'mask has {np.count_nonzero(mask)} voxels; need at least {_MIN_VOXELS} to fit tissues')
  return mask
