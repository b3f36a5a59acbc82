"""Image similarity between a predicted and a real follow-up MRI: MSE, PSNR, 3D SSIM.

Plain numpy/scipy functions on single `[x, y, z]` volumes (one value per sample), usable
outside training. Intensities are in whatever unit the caller uses (typically the
normalised [0, ~1] range of `preprocess.normalize_intensity`); `data_range` is the dynamic
range of that unit (1.0 for normalised images).

`ssim_3d` follows Wang et al. (2004) with a Gaussian window and population covariances, and
matches `skimage.metrics.structural_similarity(a, b, data_range=..., gaussian_weights=True,
sigma=1.5, use_sample_covariance=False)`: Gaussian filter truncated at 3.5 sigma, 'reflect'
borders, and (without a mask) the mean of the SSIM map over the interior, cropping
int(3.5 * sigma + 0.5) voxels from each face as skimage does.
"""

import numpy as np
from scipy import ndimage

from progression.errors import ProgressionError

_TRUNCATE = 3.5


def mse(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
  """Mean squared error (intensity units squared), over `mask` when given.

  Args:
    a, b: `[x, y, z]` images of the same shape.
    mask: optional `[x, y, z]` boolean region; the mean is taken over its voxels.

  Raises:
    ProgressionError: on shape mismatch, NaN/inf, or an empty mask.
  """
  a, b, mask = _check(a, b, mask)
  diff2 = (a - b) ** 2
  return float(diff2.mean() if mask is None else diff2[mask].mean())


def psnr(a: np.ndarray, b: np.ndarray, data_range: float,
         mask: np.ndarray | None = None) -> float:
  """Peak signal-to-noise ratio in dB: 10 * log10(data_range^2 / MSE); inf for identical images.

  Args:
    a, b: `[x, y, z]` images of the same shape (a = prediction, b = reference).
    data_range: dynamic range of the intensities (e.g. 1.0 for normalised images).
    mask: optional boolean region for the MSE.
  """
  _check_range(data_range)
  err = mse(a, b, mask)
  if err == 0.0:
    return float('inf')
  return float(10.0 * np.log10(float(data_range) ** 2 / err))


def ssim_map_3d(a: np.ndarray, b: np.ndarray, data_range: float, sigma: float = 1.5,
                k1: float = 0.01, k2: float = 0.03) -> np.ndarray:
  """Local SSIM at every voxel, `[x, y, z]` float64, Gaussian window of `sigma` voxels.

  Local means/variances/covariance are Gaussian-weighted (scipy.ndimage.gaussian_filter,
  truncate=3.5, mode='reflect'), population (not sample) covariances;
  C1 = (k1 * data_range)^2, C2 = (k2 * data_range)^2.
  """
  a, b, _ = _check(a, b, None)
  _check_range(data_range)
  if sigma <= 0:
    raise ProgressionError(f'ssim sigma must be positive voxels, got {sigma}')

  def filt(x):
    return ndimage.gaussian_filter(x, sigma=sigma, truncate=_TRUNCATE, mode='reflect')

  ux, uy = filt(a), filt(b)
  vx = filt(a * a) - ux * ux
  vy = filt(b * b) - uy * uy
  vxy = filt(a * b) - ux * uy
  c1 = (k1 * data_range) ** 2
  c2 = (k2 * data_range) ** 2
  return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))


def ssim_3d(a: np.ndarray, b: np.ndarray, data_range: float, sigma: float = 1.5,
            mask: np.ndarray | None = None, k1: float = 0.01, k2: float = 0.03) -> float:
  """Mean structural similarity of two 3D volumes (1 = identical).

  Args:
    a, b: `[x, y, z]` images of the same shape.
    data_range: dynamic range of the intensities (e.g. 1.0 for normalised images).
    sigma: Gaussian window standard deviation in voxels (1.5 -> an 11-tap window).
    mask: optional boolean region: the SSIM map (computed on the whole volume) is averaged over
      its voxels, with no border cropping. Without a mask, the map is averaged over the interior
      (r = int(3.5 * sigma + 0.5) voxels cropped from every face), exactly as skimage does.
    k1, k2: SSIM stabilising constants.

  Raises:
    ProgressionError: on shape mismatch, NaN/inf, an empty mask, or (without a mask) a volume
      smaller than the 2r + 1 window along some axis.
  """
  a, b, mask = _check(a, b, mask)
  smap = ssim_map_3d(a, b, data_range, sigma=sigma, k1=k1, k2=k2)
  if mask is not None:
    return float(smap[mask].mean())
  r = int(_TRUNCATE * sigma + 0.5)
  if min(a.shape) < 2 * r + 1:
    raise ProgressionError(
        f'ssim window ({2 * r + 1} voxels for sigma={sigma}) exceeds image shape {a.shape}')
  interior = tuple(slice(r, s - r) for s in a.shape)
  return float(smap[interior].mean(dtype=np.float64))


def image_metrics(pred: np.ndarray, target: np.ndarray, data_range: float,
                  mask: np.ndarray | None = None) -> dict[str, float]:
  """MSE, PSNR (dB) and SSIM of a prediction against its target, as a dict.

  Returns:
    {'mse': ..., 'psnr': ..., 'ssim': ...}; restricted to `mask` when given.
  """
  return {'mse': mse(pred, target, mask),
          'psnr': psnr(pred, target, data_range, mask),
          'ssim': ssim_3d(pred, target, data_range, mask=mask)}


def _check(a, b, mask):
  a = np.asarray(a, dtype=np.float64)
  b = np.asarray(b, dtype=np.float64)
  if a.shape != b.shape:
    raise ProgressionError(f'image shapes differ: {a.shape} vs {b.shape}')
  if a.ndim != 3:
    raise ProgressionError(f'expected 3D [x, y, z] images, got shape {a.shape}')
  if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
    raise ProgressionError('images contain NaN or infinite values')
  if mask is not None:
    mask = np.asarray(mask)
    if mask.shape != a.shape:
      raise ProgressionError(f'mask shape {mask.shape} does not match image shape {a.shape}')
    mask = mask.astype(bool)
    if not mask.any():
      raise ProgressionError('mask is empty')
  return a, b, mask


def _check_range(data_range: float) -> None:
  if not np.isfinite(data_range) or data_range <= 0:
    raise ProgressionError(f'data_range must be positive, got {data_range}')
