"""Known-answer tests for progression.evaluation.image_metrics."""

import numpy as np
import pytest
from scipy import ndimage

from progression.errors import ProgressionError
from progression.evaluation import image_metrics as im


def _pair(shape=(24, 20, 18), seed=0):
  rng = np.random.default_rng(seed)
  a = rng.random(shape)
  a = ndimage.gaussian_filter(a, 1.0)  # some structure, not only white noise
  b = a + 0.05 * rng.standard_normal(shape)
  return a, b


@pytest.mark.parametrize('sigma', [1.5, 1.0])
def test_ssim_matches_skimage(sigma):
  metrics = pytest.importorskip('skimage.metrics')
  a, b = _pair()
  ref = metrics.structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=sigma,
                                      use_sample_covariance=False)
  ours = im.ssim_3d(a, b, data_range=1.0, sigma=sigma)
  assert ours == pytest.approx(ref, abs=1e-4)
  # Stronger: agreement to float64 round-off.
  assert abs(ours - ref) < 1e-10
  # And a pure-noise pair with a different range.
  rng = np.random.default_rng(1)
  x, y = rng.random((16, 16, 16)) * 4, rng.random((16, 16, 16)) * 4
  ref = metrics.structural_similarity(x, y, data_range=4.0, gaussian_weights=True, sigma=sigma,
                                      use_sample_covariance=False)
  assert im.ssim_3d(x, y, 4.0, sigma=sigma) == pytest.approx(ref, abs=1e-10)


def test_masked_ssim_averages_map_inside_mask():
  a, b = _pair()
  mask = np.zeros(a.shape, bool)
  mask[5:15, 3:12, 4:10] = True
  smap = im.ssim_map_3d(a, b, 1.0)
  assert im.ssim_3d(a, b, 1.0, mask=mask) == pytest.approx(smap[mask].mean(), abs=1e-15)
  # Corrupting voxels far from the mask (beyond the window radius) leaves it unchanged.
  b2 = b.copy()
  b2[:, :, 17:] = 0.0
  assert im.ssim_3d(a, b2, 1.0, mask=mask) == pytest.approx(im.ssim_3d(a, b, 1.0, mask=mask),
                                                            abs=1e-12)


def test_identical_images():
  a, _ = _pair()
  assert im.mse(a, a) == 0.0
  assert im.psnr(a, a, 1.0) == float('inf')
  assert im.ssim_3d(a, a, 1.0) == pytest.approx(1.0, abs=1e-12)
  out = im.image_metrics(a, a, 1.0, mask=a > a.mean())
  assert out == {'mse': 0.0, 'psnr': float('inf'), 'ssim': pytest.approx(1.0, abs=1e-12)}


def test_constant_offset():
  a, _ = _pair()
  b = a + 0.1
  assert im.mse(a, b) == pytest.approx(0.01, rel=1e-12)
  assert im.psnr(a, b, 1.0) == pytest.approx(20.0, rel=1e-12)  # 10*log10(1/0.01)
  assert im.psnr(a, b, 2.0) == pytest.approx(20.0 + 20 * np.log10(2.0), rel=1e-12)
  mask = np.zeros(a.shape, bool)
  mask[2:5, 2:5, 2:5] = True
  b[~mask] += 1.0  # outside the mask the offset is 1.1
  assert im.mse(a, b, mask) == pytest.approx(0.01, rel=1e-12)
  # An offset keeps the structure term at 1 but lowers the luminance term: SSIM < 1.
  assert 0.5 < im.ssim_3d(a, a + 0.1, 1.0) < 1.0


def test_ssim_on_constant_images_uses_luminance():
  # Constant images: variances are 0, so SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1).
  a = np.full((16, 16, 16), 0.5)
  b = np.full((16, 16, 16), 0.25)
  c1 = 0.01 ** 2
  expected = (2 * 0.5 * 0.25 + c1) / (0.25 + 0.0625 + c1)
  assert im.ssim_3d(a, b, 1.0) == pytest.approx(expected, rel=1e-9)


def test_errors():
  a = np.zeros((16, 16, 16))
  with pytest.raises(ProgressionError, match='shape'):
    im.mse(a, np.zeros((16, 16, 15)))
  with pytest.raises(ProgressionError, match='shape'):
    im.ssim_3d(a, np.zeros((16, 16, 15)), 1.0)
  with pytest.raises(ProgressionError, match='shape'):
    im.image_metrics(a, np.zeros((15, 16, 16)), 1.0)
  with pytest.raises(ProgressionError, match='mask shape'):
    im.mse(a, a, mask=np.ones((16, 16), bool))
  with pytest.raises(ProgressionError, match='empty'):
    im.psnr(a, a, 1.0, mask=np.zeros(a.shape, bool))
  with pytest.raises(ProgressionError, match='data_range'):
    im.psnr(a, a + 1, 0.0)
  with pytest.raises(ProgressionError, match='NaN'):
    im.mse(a, np.full(a.shape, np.nan))
  with pytest.raises(ProgressionError, match='window'):
    im.ssim_3d(np.zeros((8, 16, 16)), np.zeros((8, 16, 16)), 1.0)
  # With a mask a small volume is fine (no cropping).
  assert im.ssim_3d(np.zeros((8, 16, 16)), np.zeros((8, 16, 16)), 1.0,
                    mask=np.ones((8, 16, 16), bool)) == pytest.approx(1.0)
