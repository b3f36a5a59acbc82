"""A built-in CSF / GM / WM tissue model for T1-weighted images (no label maps needed).

So that a predicted and a real follow-up are measured by the SAME method when no label maps
exist, this module segments any T1-like `[x, y, z]` image into three tissues:

1. `brain_mask`: the intracranial region (brain and the CSF around it), without skull and
   scalp. From a label map when one is given (`labels > 0`, any session's on this grid);
   otherwise from the image: head = smoothed image above the background, tissue = head above
   the dark (skull, CSF) / tissue threshold, an opening that cuts the bright scalp from the
   brain across the dark skull, the component deepest inside the head, a margin of dark CSF
   around it, hole filling (ventricles). Made for T1 images whose brain is separated from
   the scalp by dark skull and CSF (as the project's phantom's, and most T1w scans); for
   heads where that fails, give a skull-stripped image or a label map.
2. `fit_tissue_model`: a 3-class Gaussian mixture of the intensities inside the mask with ONE
   shared standard deviation, fitted by EM from intensity-quantile initial means; classes
   are ordered by mean, so for T1 contrast class 1 = CSF (darkest), 2 = GM, 3 = WM
   (brightest). Partial-volume voxels widen the GM class; with a class-specific spread the
   CSF / GM boundary would move towards CSF and hard GM counts would take voxels that are
   mostly CSF (measured on the phantom: brain +2-5 % with the true intracranial mask). A
   shared spread puts the boundaries near the midpoints between class means, where a voxel is
   half one tissue and half the other, so voxel counts follow partial volumes (+-0.3 %).
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
    stds: per-class standard deviation (image units; equal when fitted by
      `fit_tissue_model`, which shares one spread between classes).
    weights: per-class mixing proportion (sums to 1).
  """
  means: tuple[float, float, float]
  stds: tuple[float, float, float]
  weights: tuple[float, float, float]


def brain_mask(image: np.ndarray, threshold: float | None = None,
               smoothing_sigma_vox: float = 1.0, closing_radius_vox: int = 1,
               opening_radius_vox: int = 2, margin_vox: int = 2,
               labels: np.ndarray | None = None) -> np.ndarray:
  """Intracranial mask (brain and CSF, without skull and scalp), `[x, y, z]` bool.

  With `labels` (a label map on this image's grid; any session's of the subject once it is
  on this grid) the mask is `labels > 0`. Otherwise, from the image:
  1. smooth with a Gaussian of `smoothing_sigma_vox` voxels (noise in the dark background,
     skull and CSF);
  2. head = the largest 26-connected component above the lowest of four multi-level Otsu
     thresholds (background / dark / GM / WM), closed as in step 5, holes filled;
  3. tissue = head voxels above `threshold` (default: the lowest of three Otsu thresholds
     of the head's voxels, between dark skull / CSF and GM);
  4. opening: tissue eroded by a ball of `opening_radius_vox` voxels cuts thin bridges
     (scalp across the skull); the eroded component with the largest summed depth inside the
     head (distance to its surface) is the brain: the scalp is a thin shell at the head's
     surface, so it loses even when it is larger; dilated back and cut to tissue;
  5. the dark voxels (CSF) within `margin_vox` voxels of that brain tissue are added, the
     mask is closed with a ball of `closing_radius_vox` voxels and its holes filled
     (ventricles).
  On a skull-stripped image step 4 keeps the whole brain and step 5 adds the CSF rim.

  Args:
    image: `[x, y, z]` T1-like intensities (any unit; background near the minimum).
    threshold: intensity (image units) above which a smoothed head voxel is tissue.
    smoothing_sigma_vox: pre-threshold smoothing in voxels; 0 disables it.
    closing_radius_vox: radius of the final closing ball in voxels; 0 disables it.
    opening_radius_vox: radius of the opening ball in voxels; 0 disables the opening.
    margin_vox: width (voxels) of the dark rim kept around the brain tissue; 0 keeps none.
    labels: optional `[x, y, z]` integer label map on the image's grid.

  Raises:
    ProgressionError: for a non-3D, non-finite or constant image, a label map of another
      shape or without labels, or when no brain is found (then give a skull-stripped image
      or a label map).
  """
  image = _check_image(image)
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != image.shape:
      raise ProgressionError(f'brain_mask: label map shape {labels.shape} does not match image '
                             f'shape {image.shape}; resample it onto the image grid first')
    if not np.any(labels > 0):
      raise ProgressionError('brain_mask: the label map has no labelled voxel')
    return labels > 0
  smooth = ndimage.gaussian_filter(image, smoothing_sigma_vox) if smoothing_sigma_vox > 0 else image
  head = _largest_component(smooth > otsu_thresholds(smooth, classes=4)[0])
  head = ndimage.binary_fill_holes(_closing(head, closing_radius_vox))
  if threshold is None:
    threshold = otsu_thresholds(smooth[head], classes=3)[0]
  tissue_voxels = head & (smooth > threshold)
  if not tissue_voxels.any():
    raise ProgressionError(f'brain_mask: no voxel above threshold {threshold:.4g}')
  r = int(opening_radius_vox)
  core = ndimage.binary_erosion(tissue_voxels, _ball(r)) if r > 0 else tissue_voxels
  depth = ndimage.distance_transform_cdt(np.pad(head, 1), metric='taxicab')[1:-1, 1:-1, 1:-1]
  core = _deepest_component(core, depth)
  if core is None or np.count_nonzero(core) < _MIN_VOXELS:
    raise ProgressionError(
        'brain_mask: found no brain inside the head (skull and scalp could not be separated '
        'from it); give a skull-stripped image or a label map (labels > 0 is the mask)')
  brain = (ndimage.binary_dilation(core, _ball(r)) & tissue_voxels) if r > 0 else core
  mask = brain
  if margin_vox > 0:
    rim = ndimage.binary_dilation(brain, _ball(int(margin_vox))) & head & ~tissue_voxels
    mask = brain | rim
  return ndimage.binary_fill_holes(_closing(mask, closing_radius_vox))


def _closing(mask: np.ndarray, radius_vox: int) -> np.ndarray:
  """Binary closing with a ball, padded so it is not clipped at the volume border."""
  c = int(radius_vox)
  if c <= 0:
    return mask
  return ndimage.binary_closing(np.pad(mask, c), structure=_ball(c))[c:-c, c:-c, c:-c]


def _ball(radius_vox: int) -> np.ndarray:
  grid = np.mgrid[-radius_vox:radius_vox + 1, -radius_vox:radius_vox + 1,
                  -radius_vox:radius_vox + 1]
  return (grid ** 2).sum(axis=0) <= radius_vox * radius_vox


def _largest_component(mask: np.ndarray) -> np.ndarray:
  """The largest 26-connected component of a bool mask (the mask itself if it has one)."""
  comps, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
  if n <= 1:
    return mask
  sizes = np.bincount(comps.ravel())
  sizes[0] = 0
  return comps == int(np.argmax(sizes))


def _deepest_component(mask: np.ndarray, depth: np.ndarray) -> np.ndarray | None:
  """The 26-connected component of `mask` with the largest summed `depth`; None if empty."""
  comps, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
  if n == 0:
    return None
  score = np.bincount(comps.ravel(), weights=depth.ravel().astype(np.float64))
  score[0] = -1.0
  return comps == int(np.argmax(score))


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
  """Fits a 3-class Gaussian mixture with one shared std to the intensities inside `mask` by EM.

  The classes share their standard deviation (see the module doc: hard counts then follow
  partial volumes). EM runs on a `bins`-bin histogram of the masked intensities (each bin
  centre weighted by its count): the same fixed point as EM on the voxels up to the bin
  width (range / bins), but each iteration costs `bins` instead of one step per voxel (a
  1.5 mm brain has ~1M).
  Initial means are the 1/6, 1/2 and 5/6 intensity quantiles, initial stds a quarter of the
  inter-quantile spread, weights equal. The std is floored at 1e-3 of the intensity range.
  Iterates until the mean log-likelihood improves by < `tol`.

  Returns:
    `TissueModel` with classes sorted by mean (CSF, GM, WM for T1) and equal stds.

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
    pooled = np.sqrt((resp * (centers - means) ** 2).sum() / nk.sum())
    stds = np.full(3, max(float(pooled), floor))
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
    mask: `[x, y, z]` bool region to segment; default `brain_mask(image)` (with a label
      map, pass `brain_mask(image, labels=...)`).
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
