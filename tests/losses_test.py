"""Losses against numpy truth functions, through jax.jit, per example."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from progression import labels, losses
from progression.models import warp as warp_lib
from progression.errors import ProgressionError

RNG = np.random.default_rng(0)


def _img(shape=(2, 8, 7, 6, 1), seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_mse_plain_and_masked():
  p, t = _img(seed=1), _img(seed=2)
  np.testing.assert_allclose(jax.jit(losses.mse)(p, t), ((p - t) ** 2).mean(axis=(1, 2, 3, 4)),
                             rtol=1e-5)
  mask = (RNG.uniform(size=p.shape[:4]) > 0.5).astype(np.float32)
  mask[1] = 0.0  # empty mask -> 0, not NaN
  want0 = ((p[0] - t[0]) ** 2)[mask[0] > 0].mean()
  got = jax.jit(losses.mse)(p, t, mask)
  np.testing.assert_allclose(got, [want0, 0.0], rtol=1e-5)


def _numpy_ncc(i, j, w):
  out = []
  for b in range(i.shape[0]):
    ccs = []
    for c in range(i.shape[-1]):
      x, y = i[b, ..., c].astype(np.float64), j[b, ..., c].astype(np.float64)
      x, y = x - x.mean(), y - y.mean()
      box = lambda a: ndimage.uniform_filter(a, w, mode='constant') * w ** 3
      n = w ** 3
      si, sj = box(x), box(y)
      cross = box(x * y) - si * sj / n
      vi = np.maximum(box(x * x) - si * si / n, 0)
      vj = np.maximum(box(y * y) - sj * sj / n, 0)
      ccs.append(cross ** 2 / (vi * vj + 1e-5))
    out.append(1 - np.mean(ccs))
  return np.array(out)


@pytest.mark.parametrize('window', [3, 5])
def test_local_ncc_matches_numpy(window):
  i = _img((2, 9, 8, 7, 2), seed=3)
  j = 0.5 * i + 0.5 * _img((2, 9, 8, 7, 2), seed=4)
  got = jax.jit(losses.local_ncc, static_argnums=2)(i, j, window)
  np.testing.assert_allclose(got, _numpy_ncc(i, j, window), rtol=1e-4, atol=1e-5)


def test_local_ncc_invariant_to_affine_intensity_and_zero_for_match():
  i = _img(seed=5)
  np.testing.assert_allclose(losses.local_ncc(i, 3.0 * i + 2.0), 0.0, atol=1e-4)
  assert np.all(np.asarray(losses.local_ncc(i, _img(seed=6))) > 0.5)


def test_smoothness_known_answer():
  x = np.arange(6, dtype=np.float32)
  v = np.zeros((2, 6, 5, 4, 3), np.float32)
  v[0, ..., 0] = 2.0 * x[:, None, None]  # d/dx of component 0 is 2 -> (1/3)(4 * 1/3) = 4/9
  v[1] = RNG.normal(size=v[1].shape)
  want1 = sum(np.mean(np.diff(v[1], axis=a) ** 2) for a in range(3)) / 3
  np.testing.assert_allclose(jax.jit(losses.smoothness)(v), [4.0 / 9.0, want1], rtol=1e-5)


def test_dice_loss_known_answer():
  t = np.zeros((2, 4, 4, 4, 3), np.float32)
  t[..., 0] = 1.0
  t[:, :2, :, :, 1], t[:, :2, :, :, 0] = 1.0, 0.0  # class 1: 32 voxels
  p = t.copy()
  p[1, 0, :, :, 1], p[1, 0, :, :, 0] = 0.0, 1.0  # example 1 misses 16 of the 32 -> Dice 2*16/48
  got = jax.jit(losses.dice_loss)(p, t)  # class 2 absent everywhere: ignored
  np.testing.assert_allclose(got, [0.0, 1.0 - 32.0 / 48.0], rtol=1e-6)
  with_bg = losses.dice_loss(p, t, include_background=True)
  bg = 2 * 32 / (48 + 32)
  np.testing.assert_allclose(with_bg[1], 1.0 - (bg + 32.0 / 48.0) / 2, rtol=1e-6)
  np.testing.assert_allclose(losses.dice_loss(np.zeros_like(t), np.zeros_like(t)), 0.0)


def test_folding_known_answer():
  jac = np.ones((2, 2, 2, 2), np.float32)
  jac[1, 0, 0, 0] = -0.8
  np.testing.assert_allclose(jax.jit(losses.folding)(jac), [0.0, 0.1], rtol=1e-6)


def _batch_and_outputs():
  b = {'baseline': _img(seed=7), 'followup': _img(seed=8), 'years': np.ones(2, np.float32),
       'covariates': np.zeros((2, 4), np.float32)}
  lab = RNG.integers(0, 3, size=(2, 8, 7, 6)).astype(np.uint8)
  b['baseline_labels'], b['followup_labels'] = lab, np.roll(lab, 1, axis=1)
  out = {'prediction': _img(seed=9), 'velocity': _img((2, 4, 4, 3, 3), seed=10),
         'displacement': np.zeros((2, 8, 7, 6, 3), np.float32),
         'jacobian': 1.0 - 0.3 * np.abs(_img((2, 8, 7, 6), seed=11))}
  return b, out


def test_total_loss_is_weighted_sum_of_terms():
  batch, out = _batch_and_outputs()
  weights = {'image': 1.0, 'ncc': 0.5, 'smoothness': 0.1, 'dice': 2.0, 'volume': 4.0,
             'folding': 3.0}
  loss, metrics = jax.jit(lambda o, b: losses.total_loss(o, b, weights))(out, batch)
  assert loss.shape == (2,)
  want = (losses.mse(out['prediction'], batch['followup'])
          + 0.5 * losses.local_ncc(out['prediction'], batch['followup'])
          + 0.1 * losses.smoothness(out['velocity'])
          + 2.0 * losses.dice_loss(np.eye(3)[batch['baseline_labels']],  # zero displacement
                                   np.eye(3)[batch['followup_labels']])
          + 4.0 * 0.0  # Zero displacement, the follow-up's class counts equal the baseline's.
          + 3.0 * losses.folding(out['jacobian']))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert set(metrics) == {'mse', 'ncc', 'smoothness', 'dice', 'volume', 'headline_volume',
                          'folding', 'loss'} | {f'headline_volume_{r}'
                                                for r in losses.HEADLINE_REGIONS}
  np.testing.assert_allclose(metrics['volume'], 0.0, atol=1e-7)
  assert all(v.shape == (2,) for v in metrics.values())


def test_total_loss_disabled_terms_and_errors():
  batch, out = _batch_and_outputs()
  loss, metrics = losses.total_loss(out, batch, {'image': 2.0})
  np.testing.assert_allclose(loss, 2.0 * metrics['mse'], rtol=1e-6)
  assert set(metrics) == {'mse', 'loss'}
  with pytest.raises(ProgressionError, match='unknown loss weights'):
    losses.total_loss(out, batch, {'imgae': 1.0})
  no_labels = {k: v for k, v in batch.items() if 'labels' not in k}
  with pytest.raises(ProgressionError, match='baseline_labels'):
    losses.total_loss(out, no_labels, {'dice': 1.0})


def test_warped_labels_dice_equals_dice_of_warped_onehot_maps_and_its_gradient():
  num_classes = 5
  lab = RNG.integers(0, num_classes, size=(2, 9, 8, 7))
  target = RNG.integers(0, num_classes, size=(2, 9, 8, 7))
  target[1] = np.where(target[1] == 3, 0, target[1])  # A class only in the prediction.
  disp = RNG.normal(0.0, 2.0, size=(2, 9, 8, 7, 3)).astype(np.float32)  # Some clamped.

  def reference(d):
    warped = warp_lib.warp_labels_onehot(jax.nn.one_hot(lab, num_classes), d)
    return losses.dice_loss(warped, jax.nn.one_hot(target, num_classes)).sum()

  ours = lambda d: losses.warped_labels_dice(lab, target, d, num_classes).sum()
  want, want_grad = jax.value_and_grad(reference)(disp)
  got, got_grad = jax.jit(jax.value_and_grad(ours))(disp)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-7)
  assert np.abs(want_grad).max() > 1e-4


def test_warped_labels_dice_known_answers():
  lab = np.zeros((1, 8, 8, 8), np.int32)
  lab[0, 2:5, 2:6, 3:6] = 1
  lab[0, 5:7, 2:6, 3:6] = 2
  shifted = np.roll(lab, 1, axis=1)  # The follow-up moved one voxel up x.
  disp = np.zeros((1, 8, 8, 8, 3), np.float32)
  # Same labels: loss 0; shifted: class 1 (36 voxels) overlaps 24, class 2 (24) overlaps 12.
  dice = lambda d, t: float(losses.warped_labels_dice(lab, t, d, 3)[0])
  assert dice(disp, lab) == pytest.approx(0.0, abs=1e-7)
  assert dice(disp, shifted) == pytest.approx(1 - (2 * 24 / 72 + 2 * 12 / 48) / 2, rel=1e-6)
  # Reading from one voxel back (u = -1 along x) moves the labels onto the follow-up's.
  disp[..., 0] = -1.0
  assert dice(disp, shifted) == pytest.approx(0.0, abs=1e-6)
  # Half a voxel: every class boundary voxel is half and half.
  disp[..., 0] = -0.5
  assert 0.0 < dice(disp, shifted) < dice(np.zeros_like(disp), shifted)
  with pytest.raises(ProgressionError, match='shapes differ'):
    losses.warped_labels_dice(lab, lab[:, 1:], disp, 3)


def test_label_volume_error_known_answers():
  base = np.zeros((1, 8, 8, 8), np.int32)
  base[0, 2:6, 2:6, 2:6] = 1  # 64 voxels.
  base[0, 0, 0, :2] = 2  # 2 voxels, gone at the follow-up: not scored.
  follow = np.zeros_like(base)
  follow[0, 2:5, 2:6, 2:6] = 1  # Shrunk to 48 voxels.
  zero = np.zeros((1, 8, 8, 8, 3), np.float32)
  error = lambda d: float(losses.label_volume_error(
      losses.warped_label_sums(base, follow, d, 3))[0])
  assert error(zero) == pytest.approx(np.log((64 + 2) / (48 + 2)) ** 2, rel=1e-5)
  # A displacement that reads the block 4/3 times denser along x gives 48 voxels: no error.
  x = np.arange(8, dtype=np.float32)
  contract = zero.copy()
  contract[..., 0] = (2 + (x - 2) * 4 / 3 - x)[None, :, None, None]
  assert error(contract) == pytest.approx(0.0, abs=1e-6)
  # Its gradient points from no change towards the contraction.
  grad = jax.grad(lambda d: losses.label_volume_error(
      losses.warped_label_sums(base, follow, d, 3)).sum())(zero)
  assert float(np.sum(grad * contract)) < 0


def test_shape_mismatch_errors():
  with pytest.raises(ProgressionError, match='shapes differ'):
    losses.mse(np.zeros((1, 4, 4, 4, 1)), np.zeros((1, 4, 4, 5, 1)))
  with pytest.raises(ProgressionError, match='shapes differ'):
    losses.local_ncc(np.zeros((1, 4, 4, 4, 1)), np.zeros((2, 4, 4, 4, 1)))
  with pytest.raises(ProgressionError, match='shapes differ'):
    losses.dice_loss(np.zeros((1, 4, 4, 4, 3)), np.zeros((1, 4, 4, 4, 2)))
  with pytest.raises(ProgressionError, match='mask'):
    losses.mse(np.zeros((1, 4, 4, 4, 1)), np.zeros((1, 4, 4, 4, 1)), np.zeros((1, 4, 4)))


def test_headline_volume_error_sums_classes_into_regions():
  k = labels.NUM_CLASSES - 1
  target = np.zeros((1, k), np.float32)
  warped = np.zeros((1, k), np.float32)
  left, right = (labels.CLASS_IDS.index(i) - 1 for i in (labels.LEFT_HIPPOCAMPUS,
                                                         labels.RIGHT_HIPPOCAMPUS))
  target[0, [left, right]] = 100.0
  warped[0, left], warped[0, right] = 110.0, 90.0      # Errors cancel in the bilateral sum.
  sums = losses.LabelSums(warped, jnp.asarray(warped), jnp.asarray(target))
  assert float(losses.headline_volume_error(sums)[0]) == pytest.approx(0.0, abs=1e-10)
  assert float(losses.label_volume_error(sums)[0]) > 1e-3              # Per class they do not.
  warped[0, right] = 110.0
  sums = losses.LabelSums(warped, jnp.asarray(warped), jnp.asarray(target))
  expected = np.log(222.0 / 202.0) ** 2                                 # One region present.
  assert float(losses.headline_volume_error(sums)[0]) == pytest.approx(expected, rel=1e-5)
  per_region = np.asarray(losses.headline_volume_errors(sums)[0])
  assert per_region[losses.HEADLINE_REGIONS.index('hippocampus')] == pytest.approx(expected,
                                                                                  rel=1e-5)
  assert per_region[losses.HEADLINE_REGIONS.index('amygdala')] == 0.0   # Absent: 0.
