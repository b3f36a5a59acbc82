"""Known-answer tests for progression.preprocess: grids, world-space resampling, normalisation."""

import numpy as np
import pytest

from progression import io
from progression import preprocess
from progression.errors import ProgressionError

# A source grid that is neither RAS nor axis-aligned: permuted, flipped, rotated 20 degrees.
_C, _S = np.cos(np.radians(20.0)), np.sin(np.radians(20.0))
OBLIQUE_AFFINE = np.eye(4)
OBLIQUE_AFFINE[:3, :3] = (np.array([[_C, -_S, 0.], [_S, _C, 0.], [0., 0., 1.]])
                          @ np.array([[0., 0., -1.], [1., 0., 0.], [0., -1., 0.]])
                          @ np.diag([1.5, 2.0, 1.25]))
OBLIQUE_AFFINE[:3, 3] = [12.0, -20.0, 15.0]


def _world_coords(shape, affine) -> np.ndarray:
  """World mm of every voxel centre, `[x, y, z, 3]`."""
  index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing='ij'), axis=-1)
  return index @ affine[:3, :3].T + affine[:3, 3]


def _source_index(shape, target_affine, source_affine) -> np.ndarray:
  """Source voxel coordinates of every target voxel centre, `[x, y, z, 3]`."""
  world = _world_coords(shape, target_affine)
  inv = np.linalg.inv(source_affine)
  return world @ inv[:3, :3].T + inv[:3, 3]


def _sphere(shape, affine, center_mm, radius_mm, value=1) -> np.ndarray:
  inside = np.linalg.norm(_world_coords(shape, affine) - center_mm, axis=-1) <= radius_mm
  return np.where(inside, value, 0).astype(np.int32)


# --- Grid ------------------------------------------------------------------------------------


def test_grid_affine_puts_centre_at_center_mm():
  grid = preprocess.Grid(shape=(16, 17, 18), voxel_size_mm=(2.0, 1.5, 1.0))
  affine = grid.affine(center_mm=(10.0, -4.0, 3.0))
  np.testing.assert_allclose(affine[:3, :3], np.diag([2.0, 1.5, 1.0]))
  np.testing.assert_allclose(affine @ [7.5, 8.0, 8.5, 1.0], [10.0, -4.0, 3.0, 1.0])
  np.testing.assert_allclose(grid.affine() @ [7.5, 8.0, 8.5, 1.0], [0.0, 0.0, 0.0, 1.0])


@pytest.mark.parametrize('shape, voxel_mm', [((16, 16), (1, 1, 1)), ((16, 0, 16), (1, 1, 1)),
                                             ((16, 16, 16.5), (1, 1, 1)),
                                             ((16, 16, 16), (1, -1, 1)),
                                             ((16, 16, 16), (1, np.nan, 1)),
                                             ((16, 16, 16), 'abc')])
def test_grid_rejects_bad_fields(shape, voxel_mm):
  with pytest.raises(ProgressionError, match='Grid'):
    preprocess.Grid(shape=shape, voxel_size_mm=voxel_mm)


# --- resample --------------------------------------------------------------------------------


def test_resample_linear_image_is_exact_between_oblique_and_ras_grids():
  # f(world) = a . world + b is linear in voxel indices of any grid, so trilinear is exact.
  a, b = np.array([0.7, -1.3, 2.1]), 5.0
  source_shape = (24, 20, 28)
  source = (_world_coords(source_shape, OBLIQUE_AFFINE) @ a + b).astype(np.float64)
  target_shape = (20, 18, 22)
  target_affine = preprocess.Grid(target_shape, (1.2, 1.1, 1.3)).affine(
      center_mm=(OBLIQUE_AFFINE @ np.append((np.array(source_shape) - 1) / 2, 1.0))[:3])
  out = preprocess.resample(source, OBLIQUE_AFFINE, target_shape, target_affine, order=1)
  assert out.dtype == np.float64 and out.shape == target_shape
  index = _source_index(target_shape, target_affine, OBLIQUE_AFFINE)
  inside = np.all((index >= 0) & (index <= np.array(source_shape) - 1), axis=-1)
  assert inside.mean() > 0.3  # the check covers a good part of the grid
  expected = _world_coords(target_shape, target_affine) @ a + b
  np.testing.assert_allclose(out[inside], expected[inside], rtol=0, atol=1e-9)


def test_resample_float32_image_stays_float32():
  data = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
  out = preprocess.resample(data, np.eye(4), (6, 6, 6), np.diag([1.2, 1.2, 1.2, 1.0]), order=1)
  assert out.dtype == np.float32


@pytest.mark.parametrize('order', [0, 1])
def test_identity_resample_returns_the_input(order):
  data = np.random.default_rng(1).random((10, 12, 14)).astype(np.float32)
  out = preprocess.resample(data, OBLIQUE_AFFINE, data.shape, OBLIQUE_AFFINE, order=order)
  np.testing.assert_array_equal(out, data)
  assert out is not data


@pytest.mark.parametrize('order', [0, 1])
def test_one_voxel_translation_shifts_the_array(order):
  data = np.random.default_rng(2).random((10, 12, 14)).astype(np.float32)
  for axis in range(3):
    step = np.eye(4)
    step[axis, 3] = 1.0  # target voxel i sits where source voxel i+1 is
    target_affine = OBLIQUE_AFFINE @ step
    out = preprocess.resample(data, OBLIQUE_AFFINE, data.shape, target_affine, order=order)
    np.testing.assert_allclose(np.delete(out, -1, axis=axis), np.delete(data, 0, axis=axis),
                               atol=1e-6)
    np.testing.assert_array_equal(np.take(out, -1, axis=axis), 0.0)  # beyond the source


@pytest.mark.parametrize('target_mm, target_n', [(0.5, 52), (2.0, 16), (1.7, 18)])
def test_label_sphere_keeps_its_volume(target_mm, target_n):
  radius_mm, center_mm = 10.0, np.array([1.3, -2.1, 0.7])
  source_affine = np.diag([1.0, 1.0, 1.0, 1.0])
  source_affine[:3, 3] = -15.5
  source = _sphere((32, 32, 32), source_affine, center_mm, radius_mm, value=17)
  source_ml = np.count_nonzero(source) * 1.0 / 1000.0
  analytic_ml = 4.0 / 3.0 * np.pi * radius_mm ** 3 / 1000.0
  assert source_ml == pytest.approx(analytic_ml, rel=0.02)
  grid = preprocess.Grid((target_n,) * 3, (target_mm,) * 3)
  out = preprocess.resample(source, source_affine, grid.shape, grid.affine(center_mm), order=0)
  assert out.dtype == np.int32
  assert set(np.unique(out)) == {0, 17}  # nearest neighbour never blends ids
  out_ml = np.count_nonzero(out) * target_mm ** 3 / 1000.0
  assert out_ml == pytest.approx(source_ml, rel=0.04)


def test_resample_outside_the_source_is_zero():
  data = np.ones((8, 8, 8), np.float32)
  far = np.eye(4)
  far[:3, 3] = 100.0
  for order in (0, 1):
    assert not preprocess.resample(data, np.eye(4), (4, 4, 4), far, order=order).any()


@pytest.mark.parametrize('kwargs, match', [
    (dict(data=np.zeros((4, 4))), 'data'),
    (dict(data=np.zeros((4, 4, 4, 2))), 'data'),
    (dict(source_affine=np.eye(3)), 'source_affine'),
    (dict(source_affine=np.diag([1., 0., 1., 1.])), 'source_affine'),
    (dict(target_affine=np.full((4, 4), np.nan)), 'target_affine'),
    (dict(target_shape=(4, 4)), 'target_shape'),
    (dict(target_shape=(4, -1, 4)), 'target_shape'),
    (dict(order=3), 'order'),
])
def test_resample_rejects_bad_inputs(kwargs, match):
  args = dict(data=np.zeros((4, 4, 4)), source_affine=np.eye(4), target_shape=(4, 4, 4),
              target_affine=np.eye(4), order=1)
  args.update(kwargs)
  with pytest.raises(ProgressionError, match=match):
    preprocess.resample(**args)


# --- normalize_intensity -------------------------------------------------------------------


def _percentile_image() -> np.ndarray:
  """1000 voxels: 5% at 10, 90% spread over 20..80, 5% at 100: p1 = 10 and p99 = 100 exactly."""
  values = np.concatenate([np.full(50, 10.0), np.linspace(20.0, 80.0, 900), np.full(50, 100.0)])
  return np.random.default_rng(3).permutation(values).reshape(10, 10, 10).astype(np.float32)


def test_normalize_maps_percentiles_to_zero_and_one():
  data = _percentile_image()
  out = preprocess.normalize_intensity(data)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[data == 10.0], 0.0)
  np.testing.assert_allclose(out[data == 100.0], 1.0)
  np.testing.assert_allclose(out, (data - 10.0) / 90.0, atol=1e-6)


def test_normalize_uses_mask_percentiles_and_clips():
  data = _percentile_image()
  mask = np.zeros(data.shape, bool)
  mask[:5] = True
  lo, hi = np.percentile(data[mask], [1.0, 99.0])
  data[~mask] = np.where(data[~mask] > 50.0, 1000.0, -50.0)  # outliers outside the mask
  out = preprocess.normalize_intensity(data, mask=mask)
  np.testing.assert_allclose(out[mask], np.clip((data[mask] - lo) / (hi - lo), 0.0, 1.5),
                             atol=1e-6)
  assert set(np.unique(out[~mask])) == {0.0, 1.5}  # clipped to the documented range
  unclipped = preprocess.normalize_intensity(data, mask=mask, clip=None)
  assert unclipped.min() < 0.0 and unclipped.max() > 1.5


@pytest.mark.parametrize('kwargs, match', [
    (dict(data=np.ones((4, 4, 4))), 'constant'),
    (dict(mask=np.ones((4, 4, 3), bool)), 'mask shape'),
    (dict(mask=np.zeros((4, 4, 4), bool)), 'empty'),
    (dict(percentiles=(99.0, 1.0)), 'percentiles'),
    (dict(data=np.full((4, 4, 4), np.nan)), 'NaN'),
])
def test_normalize_rejects_bad_inputs(kwargs, match):
  args = dict(data=np.arange(64.0).reshape(4, 4, 4))
  args.update(kwargs)
  with pytest.raises(ProgressionError, match=match):
    preprocess.normalize_intensity(**args)


# --- brain_center_mm and to_grid -------------------------------------------------------------


def _off_centre_subject():
  """A 40^3 oblique scan whose bright blob (and label sphere) is far from the FOV centre."""
  shape = (40, 40, 40)
  # Off voxel centres, so no target voxel is a nearest-neighbour tie (ties round one way).
  blob_voxel = np.array([10.3, 27.2, 21.6])
  blob_mm = (OBLIQUE_AFFINE @ np.append(blob_voxel, 1.0))[:3]
  image = 100.0 * _sphere(shape, OBLIQUE_AFFINE, blob_mm, 12.0).astype(np.float32)
  image += np.random.default_rng(4).random(shape).astype(np.float32)  # dim noise
  labels = _sphere(shape, OBLIQUE_AFFINE, blob_mm, 8.0, value=17)
  return (io.from_array(image, OBLIQUE_AFFINE, path='img.nii.gz'),
          io.from_array(labels, OBLIQUE_AFFINE, path='dseg.nii.gz'), blob_mm)


def _centroid_voxel(mask: np.ndarray) -> np.ndarray:
  return np.argwhere(mask).mean(axis=0)


def test_brain_center_mm_finds_the_blob():
  image, _, blob_mm = _off_centre_subject()
  np.testing.assert_allclose(preprocess.brain_center_mm(image), blob_mm, atol=0.3)


def test_brain_center_mm_rejects_blank_image():
  blank = io.from_array(np.zeros((8, 8, 8), np.float32), np.eye(4), path='blank.nii.gz')
  with pytest.raises(ProgressionError, match='blank.nii.gz'):
    preprocess.brain_center_mm(blank)


def test_to_grid_centres_the_blob():
  image, labels, blob_mm = _off_centre_subject()
  grid = preprocess.Grid((16, 16, 16), (2.0, 2.0, 2.0))
  out = preprocess.to_grid(image, grid, labels=labels)
  assert out.image.shape == out.labels.shape == (16, 16, 16)
  assert out.image.dtype == np.float32 and out.labels.dtype == np.int32
  np.testing.assert_allclose(out.affine, grid.affine(preprocess.brain_center_mm(image)))
  grid_centre = np.full(3, 7.5)
  np.testing.assert_allclose(_centroid_voxel(out.image > 0.5), grid_centre, atol=0.3)
  np.testing.assert_allclose(_centroid_voxel(out.labels == 17), grid_centre, atol=0.3)
  np.testing.assert_allclose((out.affine @ np.append(grid_centre, 1.0))[:3], blob_mm, atol=0.3)
  # Normalised: background ~0, blob ~1 (p99 of the source is the blob's intensity).
  assert out.image.min() >= 0.0 and out.image.max() <= 1.5
  assert np.median(out.image[out.labels == 17]) == pytest.approx(1.0, abs=0.02)
  # Labels keep their volume (8 mm radius sphere) on the 2 mm grid.
  volume_ml = np.count_nonzero(out.labels) * 8.0 / 1000.0
  assert volume_ml == pytest.approx(4.0 / 3.0 * np.pi * 8.0 ** 3 / 1000.0, rel=0.08)


def test_to_grid_explicit_centre_and_no_labels():
  image, _, blob_mm = _off_centre_subject()
  grid = preprocess.Grid((16, 16, 16), (2.0, 2.0, 2.0))
  shifted = blob_mm + [4.0, 0.0, 0.0]  # the blob should land 2 voxels left of the centre
  out = preprocess.to_grid(image, grid, center_mm=shifted)
  assert out.labels is None
  np.testing.assert_allclose(_centroid_voxel(out.image > 0.5), [5.5, 7.5, 7.5], atol=0.3)


def test_to_grid_rejects_labels_in_another_world_space():
  image, labels, _ = _off_centre_subject()
  far_affine = labels.affine.copy()
  far_affine[:3, 3] += 500.0
  far_labels = io.from_array(labels.data, far_affine, path='wrong_dseg.nii.gz')
  with pytest.raises(ProgressionError, match='wrong_dseg.nii.gz'):
    preprocess.to_grid(image, preprocess.Grid((16, 16, 16), (2.0, 2.0, 2.0)), labels=far_labels)


# --- crop_or_pad -----------------------------------------------------------------------------


def test_voxels_outside_grid_known_counts():
  # A 10^3-voxel box at 1 mm and an 8^3 grid at 1 mm on its centre: 8^3 voxels inside.
  mask = np.zeros((20, 20, 20), bool)
  mask[5:15, 5:15, 5:15] = True
  grid = preprocess.Grid((8, 8, 8), (1.0, 1.0, 1.0))
  center = np.array([9.5, 9.5, 9.5])  # world mm of the box centre (identity affine)
  assert preprocess.voxels_outside_grid(mask, np.eye(4), grid, grid.affine(center)) == 1000 - 512
  # A grid of 4 mm voxels (32 mm) holds the box; centred 15 mm further along x, its lower
  # face is at 24.5 - 16 = 8.5 mm: the box's voxel slices x = 5..8 (100 voxels each) are out.
  coarse = preprocess.Grid((8, 8, 8), (4.0, 4.0, 4.0))
  assert preprocess.voxels_outside_grid(mask, np.eye(4), coarse, coarse.affine(center)) == 0
  shifted = coarse.affine(center + [15.0, 0.0, 0.0])
  assert preprocess.voxels_outside_grid(mask, np.eye(4), coarse, shifted) == 4 * 100


def test_warn_if_brain_outside_grid_names_the_file(caplog):
  mask = np.zeros((20, 20, 20), bool)
  mask[5:15, 5:15, 5:15] = True
  volume = io.from_array(np.zeros((20, 20, 20), np.float32), np.eye(4),
                         path='/data/sub-01_T1w.nii')
  grid = preprocess.Grid((8, 8, 8), (1.0, 1.0, 1.0))
  with caplog.at_level('WARNING'):
    assert preprocess.warn_if_brain_outside_grid(mask, volume, grid, grid.affine([9.5] * 3)) == 488
    big = preprocess.Grid((12, 12, 12), (1.0, 1.0, 1.0))
    assert preprocess.warn_if_brain_outside_grid(mask, volume, big, big.affine([9.5] * 3)) == 0
  (message,) = [r.getMessage() for r in caplog.records
                if 'outside the model grid' in r.getMessage()]
  assert '/data/sub-01_T1w.nii' in message and '48.8 %' in message and '0.5 mL' in message


def test_crop_or_pad_known_offsets():
  data = np.arange(10 * 4 * 5).reshape(10, 4, 5)
  out = preprocess.crop_or_pad(data, (7, 7, 5))
  assert out.shape == (7, 7, 5)
  # Axis 0 crops 3 (new i = old i + 1); axis 1 pads 3 (new i = old i - 2); axis 2 unchanged.
  np.testing.assert_array_equal(out[:, 2:6, :], data[1:8])
  assert not out[:, :2].any() and not out[:, 6:].any()


def test_crop_or_pad_keeps_trailing_axes_and_rejects_bad_shapes():
  data = np.ones((4, 4, 4, 2))
  assert preprocess.crop_or_pad(data, (6, 2, 4)).shape == (6, 2, 4, 2)
  with pytest.raises(ProgressionError, match='crop_or_pad'):
    preprocess.crop_or_pad(np.ones((4, 4)), (4, 4, 4))
