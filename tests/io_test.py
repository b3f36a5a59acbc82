"""Tests for progression.io: canonical RAS+ loading, round trips, validation, atomic saves.

Every NIfTI file is built here with nibabel in pytest's tmp_path (no committed binaries).
"""

import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from progression import io
from progression.errors import ProgressionError

# A non-RAS file: file axis 0 -> +A (2 mm), axis 1 -> -S (1.5 mm), axis 2 -> -R (3 mm).
PERMUTED_FLIPPED_AFFINE = np.array([
    [0., 0., -3., 10.],
    [2., 0., 0., -5.],
    [0., -1.5, 0., 7.],
    [0., 0., 0., 1.],
])


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
  """Writes `data` with `affine` (identity by default) as sform and qform."""
  nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
  return path


def _write_sform_only(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
  """Writes `affine` as the sform alone: nibabel cannot turn a degenerate affine into a qform."""
  img = nib.Nifti1Image(data, None)
  img.header.set_sform(affine, code=2)
  img.header.set_qform(None, code=0)
  nib.save(img, str(path))
  return path


def _ramp(shape=(4, 5, 6)) -> np.ndarray:
  """Distinct float32 values per voxel, so any reordering of axes is visible."""
  return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def _assert_error_names(path: Path, loader=io.load_image, match: str | None = None) -> None:
  with pytest.raises(ProgressionError) as info:
    loader(path)
  assert path.name in str(info.value)
  if match is not None:
    assert match in str(info.value)


# --- canonical orientation and round trips -------------------------------------------------


def test_load_permuted_flipped_file_gives_ras_canonical(tmp_path):
  data = _ramp()
  path = _write_nifti(tmp_path / 'obl.nii.gz', data, PERMUTED_FLIPPED_AFFINE)
  vol = io.load_image(path)
  assert vol.data.dtype == np.float32
  # Canonical x (R) is the file's flipped axis 2, y (A) is axis 0, z (S) is flipped axis 1.
  expected = np.transpose(data[:, ::-1, ::-1], (2, 0, 1))
  np.testing.assert_array_equal(vol.data, expected)
  np.testing.assert_allclose(np.diag(vol.affine)[:3], [3., 2., 1.5])
  np.testing.assert_allclose(vol.affine[:3, :3], np.diag([3., 2., 1.5]))
  assert vol.original_shape == (4, 5, 6)
  np.testing.assert_array_equal(vol.original_affine, PERMUTED_FLIPPED_AFFINE)
  # Every canonical voxel sits at the same world point as its source voxel in the file.
  i, j, k = 1, 2, 3  # file voxel
  world = PERMUTED_FLIPPED_AFFINE @ [i, j, k, 1]
  canon_index = np.linalg.solve(vol.affine, world)[:3]
  ci, cj, ck = np.rint(canon_index).astype(int)
  np.testing.assert_allclose(canon_index, [ci, cj, ck], atol=1e-9)
  assert vol.data[ci, cj, ck] == data[i, j, k]


def test_round_trip_restores_exact_voxels_and_affine(tmp_path):
  data = _ramp()
  src = _write_nifti(tmp_path / 'in.nii.gz', data, PERMUTED_FLIPPED_AFFINE)
  vol = io.load_image(src)
  np.testing.assert_array_equal(vol.to_original(vol.data), data)
  out = io.save_volume_like(tmp_path / 'out' / 'copy.nii.gz', vol.data, vol)
  back = nib.load(str(out))
  np.testing.assert_array_equal(np.asarray(back.dataobj), data)
  np.testing.assert_allclose(back.affine, PERMUTED_FLIPPED_AFFINE, atol=1e-6)


def test_label_round_trip_keeps_integer_ids(tmp_path):
  labels = np.zeros((4, 5, 6), np.int16)
  labels[1, 2, 3], labels[0, 0, 0] = 17, 53
  src = _write_nifti(tmp_path / 'dseg.nii.gz', labels, PERMUTED_FLIPPED_AFFINE)
  vol = io.load_labels(src)
  assert vol.data.dtype == np.int32
  assert sorted(np.unique(vol.data)) == [0, 17, 53]
  out = io.save_labels(tmp_path / 'dseg_out.nii.gz', vol.to_original(vol.data), vol.original_affine)
  back = nib.load(str(out))
  assert back.get_data_dtype() == np.int16
  np.testing.assert_array_equal(np.asarray(back.dataobj), labels)


def test_voxel_size_and_volume_from_affine(tmp_path):
  vol = io.load_image(_write_nifti(tmp_path / 'v.nii', _ramp(), PERMUTED_FLIPPED_AFFINE))
  assert vol.voxel_size_mm == pytest.approx((3.0, 2.0, 1.5))  # canonical R, A, S order
  assert vol.voxel_volume_ml == pytest.approx(3.0 * 2.0 * 1.5 / 1000.0)


def test_voxel_size_of_rotated_affine_uses_column_norms():
  c, s = np.cos(0.3), np.sin(0.3)
  affine = np.diag([1., 1., 1., 1.])
  affine[:3, :3] = np.array([[c, -s, 0.], [s, c, 0.], [0., 0., 1.]]) @ np.diag([1.2, 0.8, 2.5])
  vol = io.from_array(np.zeros((3, 3, 3), np.float32), affine)
  assert vol.voxel_size_mm == pytest.approx((1.2, 0.8, 2.5))
  assert vol.voxel_volume_ml == pytest.approx(1.2 * 0.8 * 2.5 / 1000.0)


def test_4d_single_volume_is_accepted(tmp_path):
  data = _ramp((4, 5, 6, 1))
  vol = io.load_image(_write_nifti(tmp_path / 'one.nii.gz', data))
  assert vol.data.shape == (4, 5, 6)
  np.testing.assert_array_equal(vol.data, data[..., 0])


# --- validation: every error names the file ---------------------------------------------------


def test_missing_file(tmp_path):
  _assert_error_names(tmp_path / 'nothing_here.nii.gz', match='not found')


def test_corrupt_gzip(tmp_path):
  path = tmp_path / 'garbage.nii.gz'
  path.write_bytes(np.random.default_rng(0).bytes(2000))
  _assert_error_names(path)


def test_truncated_gzip(tmp_path):
  # Random voxels do not compress, so half the file cuts the voxel data, not just the header.
  data = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
  full = _write_nifti(tmp_path / 'full.nii.gz', data).read_bytes()
  path = tmp_path / 'truncated.nii.gz'
  path.write_bytes(full[:len(full) // 2])
  _assert_error_names(path)


def test_corrupt_header_datatype(tmp_path):
  raw = bytearray(_write_nifti(tmp_path / 'ok.nii', _ramp()).read_bytes())
  raw[70:72] = np.int16(999).tobytes()  # NIfTI-1 `datatype` field: an unknown code
  path = tmp_path / 'bad_header.nii'
  path.write_bytes(bytes(raw))
  _assert_error_names(path)


def test_2d_image_rejected(tmp_path):
  _assert_error_names(_write_nifti(tmp_path / 'slice.nii.gz', _ramp((4, 5))), match='3D')


def test_4d_image_with_two_volumes_rejected(tmp_path):
  _assert_error_names(_write_nifti(tmp_path / 'fmri.nii.gz', _ramp((4, 5, 6, 2))), match='3D')


def test_one_voxel_slab_rejected(tmp_path):
  _assert_error_names(_write_nifti(tmp_path / 'slab.nii.gz', _ramp((4, 5, 1))))


@pytest.mark.parametrize('bad_value, name', [(np.nan, 'nan_voxels'), (np.inf, 'inf_voxels'),
                                             (-np.inf, 'neg_inf_voxels')])
def test_non_finite_voxels_rejected(tmp_path, bad_value, name):
  data = _ramp()
  data[1, 1, 1] = bad_value
  path = _write_nifti(tmp_path / f'{name}.nii.gz', data)
  _assert_error_names(path, match='NaN or infinite')
  _assert_error_names(path, loader=io.load_labels)


def test_singular_affine_rejected(tmp_path):
  path = _write_sform_only(tmp_path / 'singular.nii.gz', _ramp(), np.diag([1., 0., 1., 1.]))
  _assert_error_names(path, match='singular')


def test_non_finite_affine_rejected(tmp_path):
  affine = np.eye(4)
  affine[:3, 3] = np.nan
  path = _write_sform_only(tmp_path / 'nan_affine.nii.gz', _ramp(), affine)
  _assert_error_names(path, match='finite')


def test_label_map_with_non_integer_values_rejected(tmp_path):
  data = np.zeros((4, 5, 6), np.float32)
  data[2, 2, 2] = 17.5
  path = _write_nifti(tmp_path / 'soft_labels.nii.gz', data)
  _assert_error_names(path, loader=io.load_labels, match='non-integer')
  assert io.load_image(path).data[2, 2, 2] == 17.5  # fine as an intensity image


def test_from_array_validates():
  with pytest.raises(ProgressionError, match='my_array'):
    io.from_array(np.zeros((4, 4)), np.eye(4), path='my_array')
  with pytest.raises(ProgressionError, match='4x4'):
    io.from_array(np.zeros((4, 4, 4)), np.eye(3))


# --- atomic saves ----------------------------------------------------------------------------


def test_atomic_save_leaves_no_temp_files(tmp_path):
  out = tmp_path / 'out'
  io.save_image(out / 'img.nii.gz', _ramp(), np.eye(4))
  io.save_image(out / 'img.nii.gz', _ramp() + 1, np.eye(4))  # overwrite in place
  assert sorted(p.name for p in out.iterdir()) == ['img.nii.gz']
  np.testing.assert_array_equal(io.load_image(out / 'img.nii.gz').data, _ramp() + 1)


def _text_writers(**texts):
  return {name.replace('_', '.'): (lambda path, t=text: path.write_text(t))
          for name, text in texts.items()}


def test_write_folder_all_or_nothing(tmp_path):
  out = tmp_path / 'report'
  paths = io.write_folder(out, _text_writers(a_csv='1', done_md='ok'))
  assert [p.name for p in paths] == ['a.csv', 'done.md'] and paths[0].read_text() == '1'
  # Into an existing folder: other files stay, the set is replaced, no staging left.
  (out / 'notes.txt').write_text('kept')
  io.write_folder(out, _text_writers(a_csv='2', done_md='ok2'))
  assert sorted(p.name for p in out.iterdir()) == ['a.csv', 'done.md', 'notes.txt']
  assert (out / 'a.csv').read_text() == '2' and (out / 'notes.txt').read_text() == 'kept'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['report']

  def fails(path):
    raise OSError(28, 'No space left on device')
  with pytest.raises(ProgressionError, match='report2.*No space left'):
    io.write_folder(tmp_path / 'report2', {'a.csv': fails, 'done.md': fails})
  assert sorted(p.name for p in tmp_path.iterdir()) == ['report']  # Nothing half-made.


def test_saved_files_get_umask_permissions_not_owner_only(tmp_path):
  path = io.save_image(tmp_path / 'img.nii.gz', _ramp(), np.eye(4))
  umask = os.umask(0o022)
  os.umask(umask)
  assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
  def half_write_then_fail(img, filename):
    Path(filename).write_bytes(b'\x1f\x8b partial')
    raise RuntimeError('simulated crash midway through the write')

  existing = io.save_image(tmp_path / 'kept.nii.gz', _ramp(), np.eye(4))
  before = existing.read_bytes()
  monkeypatch.setattr(nib, 'save', half_write_then_fail)
  with pytest.raises(RuntimeError, match='simulated'):
    io.save_image(tmp_path / 'new.nii.gz', _ramp(), np.eye(4))
  with pytest.raises(RuntimeError, match='simulated'):
    io.save_image(existing, _ramp() * 2, np.eye(4))
  assert [p.name for p in tmp_path.iterdir()] == ['kept.nii.gz']
  assert existing.read_bytes() == before


def test_os_error_during_write_becomes_progression_error(tmp_path, monkeypatch):
  def disk_full(img, filename):
    Path(filename).write_bytes(b'partial')
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(nib, 'save', disk_full)
  with pytest.raises(ProgressionError, match='full.nii.gz'):
    io.save_image(tmp_path / 'full.nii.gz', _ramp(), np.eye(4))
  assert list(tmp_path.iterdir()) == []


def test_output_under_a_file_raises(tmp_path):
  blocker = tmp_path / 'not_a_dir'
  blocker.write_text('x')
  with pytest.raises(ProgressionError, match='not_a_dir'):
    io.save_image(blocker / 'img.nii.gz', _ramp(), np.eye(4))
  with pytest.raises(ProgressionError, match='not_a_dir/deeper'):
    io.write_folder(blocker / 'deeper', _text_writers(notes_txt='x'))
  assert blocker.read_text() == 'x'


@pytest.mark.skipif(os.name != 'posix' or os.geteuid() == 0,
                    reason='root can write into read-only folders (os.access says yes)')
def test_read_only_output_dir_raises(tmp_path):
  locked = tmp_path / 'locked'
  locked.mkdir()
  locked.chmod(0o555)
  try:
    with pytest.raises(ProgressionError, match='locked'):
      io.save_image(locked / 'img.nii.gz', _ramp(), np.eye(4))
  finally:
    locked.chmod(0o755)


def test_save_rejects_non_3d_and_bad_affine(tmp_path):
  with pytest.raises(ProgressionError, match='4D'):
    io.save_image(tmp_path / 'x.nii.gz', _ramp((2, 2, 2, 2)), np.eye(4))
  with pytest.raises(ProgressionError, match='singular'):
    io.save_image(tmp_path / 'y.nii.gz', _ramp(), np.diag([1., 1., 0., 1.]))
  assert list(tmp_path.iterdir()) == []


# --- label maps: conventions, unknown ids, intensity images given as labels -----------------


def _label_file(path: Path, counts: dict[int, int], dtype=np.int16) -> Path:
  """A 6x6x6 label map with exactly `counts[id]` voxels of each id (rest background)."""
  flat = np.concatenate([np.full(n, i) for i, n in counts.items()]).astype(dtype)
  flat = np.concatenate([flat, np.zeros(216 - flat.size, dtype)])
  return _write_nifti(path, np.random.default_rng(0).permutation(flat).reshape(6, 6, 6))


def _unknown_id_warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records
          if r.levelname == 'WARNING' and 'no known convention' in r.getMessage()]


def test_label_map_with_a_few_unknown_ids_warns_once_per_file(tmp_path, caplog):
  counts = {2: 40, 3: 30, 1005: 20, 17: 5, 999: 3, 5000: 1}  # 4 of 99 non-zero voxels unknown
  path = _label_file(tmp_path / 'odd_dseg.nii.gz', counts)
  with caplog.at_level('WARNING'):
    vol = io.load_labels(path)
    io.load_labels(path)
  assert np.count_nonzero(vol.data == 999) == 3
  (message,) = _unknown_id_warnings(caplog)
  assert str(path) in message and '999: 3, 5000: 1' in message and '4 voxels' in message
  assert 'synthseg_parc' in message  # parcels without FreeSurfer-only ids
  caplog.clear()
  with caplog.at_level('WARNING'):
    io.load_labels(_label_file(tmp_path / 'other_dseg.nii.gz', counts))
    io.load_labels(_label_file(tmp_path / 'clean_dseg.nii.gz', {2: 40, 3: 30, 77: 2}))
  assert len(_unknown_id_warnings(caplog)) == 1  # a new file warns again; a clean one does not


@pytest.mark.parametrize('dtype', [np.int16, np.float32])
def test_uniform_random_ids_are_not_a_label_map(tmp_path, dtype):
  data = np.random.default_rng(1).integers(0, 1001, (6, 7, 8)).astype(dtype)
  path = _write_nifti(tmp_path / 'T1w_as_labels.nii.gz', data)
  _assert_error_names(path, loader=io.load_labels, match='not a label map')
  assert io.load_image(path).data.shape == (6, 7, 8)


def test_float_intensity_image_is_not_a_label_map(tmp_path):
  data = 100.0 + 20.0 * np.random.default_rng(2).standard_normal((6, 7, 8)).astype(np.float32)
  path = _write_nifti(tmp_path / 'T1w.nii.gz', data)
  _assert_error_names(path, loader=io.load_labels, match='non-integer')
  _assert_error_names(_write_nifti(tmp_path / 'rounded_T1w.nii.gz', np.rint(data)),
                      loader=io.load_labels, match='not a label map')


def test_huge_values_are_not_a_label_map(tmp_path):
  data = np.zeros((4, 4, 4), np.float64)
  data[0, 0, 0] = 3e12
  _assert_error_names(_write_nifti(tmp_path / 'huge.nii.gz', data), loader=io.load_labels,
                      match='not a label map')


def test_check_label_map_on_arrays():
  ids = io.check_label_map(np.array([[[0, 2], [1005, 17]]] * 2, np.float64), 'in-memory labels')
  assert ids.dtype == np.int32 and ids[0, 1, 0] == 1005
  with pytest.raises(ProgressionError, match='in-memory labels: not a label map'):
    io.check_label_map(np.full((2, 2, 2), 7000, np.int32), 'in-memory labels')
  assert io.check_label_map(np.zeros((2, 2, 2), np.uint8), 'empty').sum() == 0
