"""Known-answer tests for progression.evaluation.volumes."""

import numpy as np
import pytest

from progression import io
from progression import labels as L
from progression.errors import ProgressionError
from progression.evaluation import volumes

RADIUS_MM = 20.0
SPHERE_ML = 4.0 / 3.0 * np.pi * RADIUS_MM ** 3 / 1000.0


def _sphere(voxel_mm, label=L.LEFT_HIPPOCAMPUS, offset_vox=0.17):
  """A ball of radius RADIUS_MM (voxel centres inside), centred off-grid by `offset_vox`."""
  voxel_mm = np.asarray(voxel_mm, dtype=float)
  n = np.ceil(2 * RADIUS_MM / voxel_mm).astype(int) + 4
  axes = [(np.arange(n[i]) - (n[i] - 1) / 2 + offset_vox) * voxel_mm[i] for i in range(3)]
  x, y, z = np.meshgrid(*axes, indexing='ij')
  return np.where(x ** 2 + y ** 2 + z ** 2 <= RADIUS_MM ** 2, label, 0).astype(np.int32)


@pytest.mark.parametrize('voxel_mm', [(1., 1., 1.), (2., 2., 2.), (1., 1.5, 2.),
                                      (0.8, 2.5, 1.2), (3., 3., 3.)])
def test_voxelised_sphere_volume(voxel_mm):
  seg = _sphere(voxel_mm)
  vox_ml = float(np.prod(voxel_mm)) / 1000.0
  vols = volumes.regional_volumes_ml(seg, vox_ml)
  # Discretisation error of voxel-centre sampling at r / h >= 6.7 is < 1 %; allow 2 %.
  assert vols['hippocampus'] == pytest.approx(SPHERE_ML, rel=0.02)
  assert vols['amygdala'] == 0.0
  # The voxel count is exact.
  assert vols['hippocampus'] == pytest.approx(np.count_nonzero(seg) * vox_ml, rel=1e-12)


def test_volumes_from_volume_uses_affine_voxel_size():
  voxel_mm = (1., 1.5, 2.)
  seg = _sphere(voxel_mm, label=L.CSF)
  # A flipped x axis (LAS) with anisotropic voxels: canonicalisation must keep the volume.
  affine = np.diag([-voxel_mm[0], voxel_mm[1], voxel_mm[2], 1.0])
  vol = io.from_array(seg, affine)
  vols = volumes.volumes_from_volume(vol)
  assert vols['csf'] == pytest.approx(np.count_nonzero(seg) * 3.0 / 1000.0, rel=1e-12)
  assert vols['csf'] == pytest.approx(SPHERE_ML, rel=0.02)


def test_region_sums_use_the_right_ids():
  seg = np.zeros((10, 10, 10), np.int32)
  counts = {L.LEFT_HIPPOCAMPUS: 7, L.RIGHT_HIPPOCAMPUS: 11, L.LEFT_AMYGDALA: 3,
            L.RIGHT_AMYGDALA: 5, L.LEFT_LATERAL_VENTRICLE: 13, L.RIGHT_LATERAL_VENTRICLE: 17,
            L.LEFT_INF_LAT_VENTRICLE: 2, L.RIGHT_INF_LAT_VENTRICLE: 4, L.LEFT_THALAMUS: 19,
            L.RIGHT_THALAMUS: 23, L.LEFT_CORTEX: 29, L.RIGHT_CORTEX: 31,
            L.LEFT_CEREBRAL_WM: 37, L.RIGHT_CEREBRAL_WM: 41, L.CSF: 43, L.BRAINSTEM: 47,
            L.THIRD_VENTRICLE: 53}
  flat = seg.reshape(-1)
  start = 0
  for label, n in counts.items():
    flat[start:start + n] = label
    start += n
  vox_ml = 0.002
  v = volumes.regional_volumes_ml(seg, vox_ml)
  assert v['hippocampus'] == pytest.approx(18 * vox_ml)
  assert v['amygdala'] == pytest.approx(8 * vox_ml)
  assert v['lateral_ventricles'] == pytest.approx(30 * vox_ml)
  assert v['thalamus'] == pytest.approx(42 * vox_ml)
  assert v['cortex'] == pytest.approx(60 * vox_ml)
  assert v['cerebral_wm'] == pytest.approx(78 * vox_ml)
  assert v['csf'] == pytest.approx(43 * vox_ml)
  # WM 78 + cortex 60 + thalamus 42 + hippocampus 18 + amygdala 8 + brainstem 47.
  assert v['whole_brain'] == pytest.approx(253 * vox_ml)
  assert set(v) == set(L.REGIONS)
  v_inf = volumes.regional_volumes_ml(seg, vox_ml, include_inferior_lateral=True)
  assert v_inf['lateral_ventricles'] == pytest.approx(36 * vox_ml)
  custom = volumes.regional_volumes_ml(seg, vox_ml, regions={'third': (L.THIRD_VENTRICLE,),
                                                             'absent': (99,)})
  assert custom == pytest.approx({'third': 53 * vox_ml, 'absent': 0.0})


@pytest.mark.parametrize('scale', [0.9, 1.0, 1.07])
def test_uniform_scaling_jacobian_gives_s_cubed(scale):
  seg = _sphere((2., 2., 2.))
  seg[:4] = L.CSF
  vox_ml = 0.008
  jac = np.full(seg.shape, scale ** 3)
  base = volumes.regional_volumes_ml(seg, vox_ml)
  fu = volumes.jacobian_integrated_volumes_ml(seg, jac, vox_ml)
  for name in base:
    assert fu[name] == pytest.approx(scale ** 3 * base[name], rel=1e-12, abs=1e-15)


def test_jacobian_integration_is_local():
  seg = np.zeros((8, 8, 8), np.int32)
  seg[:4] = L.LEFT_HIPPOCAMPUS
  seg[4:] = L.LEFT_CORTEX
  jac = np.ones(seg.shape)
  jac[:4] = 0.5     # hippocampus halves
  jac[4:, :4] = 2.0  # half of the cortex doubles
  v = volumes.jacobian_integrated_volumes_ml(seg, jac, 1.0)
  assert v['hippocampus'] == pytest.approx(0.5 * 256)
  assert v['cortex'] == pytest.approx(2.0 * 128 + 128)


def test_annualized_percent_change_compound():
  v0 = 4.0
  v1 = v0 * 0.98 ** 3  # 2 % per year compound decline over 3 years
  assert volumes.annualized_percent_change(v0, v1, 3.0) == pytest.approx(-2.0, abs=1e-12)
  assert volumes.percent_change(v0, v1) == pytest.approx(100 * (0.98 ** 3 - 1), abs=1e-12)
  # Linear annualisation (total change / years) would give -1.9603, compound gives -2.
  assert volumes.percent_change(v0, v1) / 3 == pytest.approx(-1.960267, abs=1e-6)
  # Growth (ventricles 10 %/yr over 1.5 years), and arrays broadcast.
  rates = volumes.annualized_percent_change(np.array([10., 20.]),
                                            np.array([10. * 1.1 ** 1.5, 20.]), 1.5)
  np.testing.assert_allclose(rates, [10.0, 0.0], atol=1e-12)
  assert volumes.annualized_percent_change(5.0, 5.0, 2.0) == 0.0


def test_validation_errors():
  seg = np.zeros((4, 4, 4), np.int32)
  with pytest.raises(ProgressionError, match='shape'):
    volumes.jacobian_integrated_volumes_ml(seg, np.ones((4, 4, 5)), 1.0)
  with pytest.raises(ProgressionError, match='NaN'):
    volumes.jacobian_integrated_volumes_ml(seg, np.full((4, 4, 4), np.nan), 1.0)
  with pytest.raises(ProgressionError, match='3D'):
    volumes.regional_volumes_ml(np.zeros((4, 4)), 1.0)
  with pytest.raises(ProgressionError, match='non-integer'):
    volumes.regional_volumes_ml(np.full((4, 4, 4), 0.5), 1.0)
  with pytest.raises(ProgressionError, match='negative'):
    volumes.regional_volumes_ml(-np.ones((4, 4, 4), np.int32), 1.0)
  with pytest.raises(ProgressionError, match='voxel_volume_ml'):
    volumes.regional_volumes_ml(seg, 0.0)
  with pytest.raises(ProgressionError, match='baseline'):
    volumes.annualized_percent_change(0.0, 1.0, 1.0)
  with pytest.raises(ProgressionError, match='interval'):
    volumes.annualized_percent_change(1.0, 1.0, 0.0)
  with pytest.raises(ProgressionError, match='follow-up'):
    volumes.percent_change(1.0, -1.0)
  # Float label maps holding integers are accepted.
  assert volumes.regional_volumes_ml(np.full((4, 4, 4), 24.0), 1.0)['csf'] == 64.0
