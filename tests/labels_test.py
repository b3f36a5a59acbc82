"""Known-answer tests for progression.labels: regions, conventions and left/right swaps.

Each convention gets a small constructed map with a few voxels of each id it writes; the
expected volumes are written out by hand, not read from `labels.REGIONS`.
"""

import numpy as np
import pytest

from progression import labels as L
from progression.evaluation import volumes

# Id -> voxel count, per anatomical group (counts distinct enough to tell sums apart).
CEREBRAL_WM = {2: 40, 41: 42}
CORTEX = {3: 30, 42: 31}
HIPPO_AMYG = {17: 7, 53: 8, 18: 3, 54: 4}
THALAMUS = {10: 9, 49: 10}
OTHER_SUBCORTICAL = {11: 5, 50: 6, 12: 11, 51: 12, 13: 2, 52: 3, 26: 1, 58: 2, 28: 6, 60: 5}
CEREBELLUM = {7: 13, 46: 14, 8: 20, 47: 21}
BRAINSTEM = {16: 15}
VENTRICLES_CSF = {4: 16, 43: 17, 5: 2, 44: 3, 14: 4, 15: 5, 24: 50}
FREESURFER_ONLY_WM = {77: 6, 251: 1, 252: 1, 253: 2, 254: 1, 255: 1}
FREESURFER_ONLY_OTHER = {30: 1, 62: 1, 31: 2, 63: 2, 72: 1, 80: 1, 85: 1}
DK_PARCELS = {1002: 4, 1028: 6, 1035: 3, 2002: 5, 2028: 7, 2035: 2}
DESTRIEUX_PARCELS = {11101: 3, 11175: 4, 12101: 5, 12175: 6}

SYNTHSEG = {**CEREBRAL_WM, **CORTEX, **HIPPO_AMYG, **THALAMUS, **OTHER_SUBCORTICAL,
            **CEREBELLUM, **BRAINSTEM, **VENTRICLES_CSF}
ASEG = {**SYNTHSEG, **FREESURFER_ONLY_WM, **FREESURFER_ONLY_OTHER}
CORTEX_REMNANT = {3: 2, 42: 1}  # aparc+aseg leaves a few unassigned cortex voxels at 3/42.
APARC_ASEG = {**{k: v for k, v in ASEG.items() if k not in CORTEX}, **CORTEX_REMNANT,
              **DK_PARCELS}
APARC_A2009S_ASEG = {**{k: v for k, v in ASEG.items() if k not in CORTEX}, **DESTRIEUX_PARCELS}
SYNTHSEG_PARC = {**{k: v for k, v in SYNTHSEG.items() if k not in CORTEX}, **DK_PARCELS}
# The synthetic phantom's ids (progression.phantom): a subset of aseg's.
PHANTOM = {**CEREBRAL_WM, **CORTEX, **HIPPO_AMYG, **THALAMUS, **BRAINSTEM, **VENTRICLES_CSF}


def label_map(counts: dict[int, int], shape=(12, 12, 12)) -> np.ndarray:
  """A map with exactly `counts[id]` voxels of each id (rest background), shuffled."""
  flat = np.concatenate([np.full(n, i, np.int32) for i, n in counts.items()])
  assert flat.size <= np.prod(shape)
  flat = np.concatenate([flat, np.zeros(np.prod(shape) - flat.size, np.int32)])
  return np.random.default_rng(0).permutation(flat).reshape(shape)


def total(*groups: dict[int, int]) -> int:
  return sum(sum(g.values()) for g in groups)


CASES = {  # convention -> (map counts, expected cortex, cerebral WM, whole-brain voxels)
    'synthseg': (SYNTHSEG, total(CORTEX), total(CEREBRAL_WM),
                 total(CEREBRAL_WM, CORTEX, HIPPO_AMYG, THALAMUS, OTHER_SUBCORTICAL, CEREBELLUM,
                       BRAINSTEM)),
    'aseg': (ASEG, total(CORTEX), total(CEREBRAL_WM, FREESURFER_ONLY_WM),
             total(CEREBRAL_WM, FREESURFER_ONLY_WM, CORTEX, HIPPO_AMYG, THALAMUS,
                   OTHER_SUBCORTICAL, CEREBELLUM, BRAINSTEM) + 1 + 1),  # + 80 and 85
    'aparc+aseg': (APARC_ASEG, total(CORTEX_REMNANT, DK_PARCELS),
                   total(CEREBRAL_WM, FREESURFER_ONLY_WM),
                   total(CEREBRAL_WM, FREESURFER_ONLY_WM, CORTEX_REMNANT, DK_PARCELS,
                         HIPPO_AMYG, THALAMUS, OTHER_SUBCORTICAL, CEREBELLUM, BRAINSTEM) + 2),
    'synthseg_parc': (SYNTHSEG_PARC, total(DK_PARCELS), total(CEREBRAL_WM),
                      total(CEREBRAL_WM, DK_PARCELS, HIPPO_AMYG, THALAMUS, OTHER_SUBCORTICAL,
                            CEREBELLUM, BRAINSTEM)),
}


@pytest.mark.parametrize('convention', list(CASES))
def test_regional_volumes_per_convention(convention):
  counts, cortex, wm, whole = CASES[convention]
  vox_ml = 0.001
  v = volumes.regional_volumes_ml(label_map(counts), vox_ml)
  assert set(v) == {'hippocampus', 'amygdala', 'lateral_ventricles', 'thalamus', 'cortex',
                    'cerebral_wm', 'csf', 'whole_brain'}
  assert v['hippocampus'] == pytest.approx(15 * vox_ml)
  assert v['amygdala'] == pytest.approx(7 * vox_ml)
  assert v['lateral_ventricles'] == pytest.approx(33 * vox_ml)
  assert v['thalamus'] == pytest.approx(19 * vox_ml)
  assert v['csf'] == pytest.approx(50 * vox_ml)
  assert v['cortex'] == pytest.approx(cortex * vox_ml)
  assert v['cerebral_wm'] == pytest.approx(wm * vox_ml)
  assert v['whole_brain'] == pytest.approx(whole * vox_ml)
  extra = volumes.regional_volumes_ml(label_map(counts), vox_ml, regions=L.EXTRA_REGIONS)
  assert extra['subcortical_gm'] == pytest.approx(total(THALAMUS, OTHER_SUBCORTICAL) * vox_ml)
  assert extra['cerebellum'] == pytest.approx(total(CEREBELLUM) * vox_ml)


def test_whole_brain_includes_caudate_and_cerebellum_and_excludes_fluid():
  brain = set(L.REGIONS['whole_brain'])
  assert {11, 50, 12, 51, 13, 52, 26, 58, 28, 60, 7, 46, 8, 47, 16} <= brain
  assert {1000, 1035, 2000, 2035, 11101, 12175, 251, 255, 77, 85} <= brain
  assert not brain & {0, 4, 43, 5, 44, 14, 15, 72, 24, 30, 62, 31, 63}
  cortex = set(L.REGIONS['cortex'])
  assert {3, 42} | set(range(1000, 1036)) | set(range(2000, 2036)) <= cortex
  assert not cortex & set(L.REGIONS['cerebral_wm'])


@pytest.mark.parametrize('convention,counts', [
    ('aseg', ASEG), ('aparc+aseg', APARC_ASEG), ('aparc+aseg', APARC_A2009S_ASEG),
    ('synthseg', SYNTHSEG), ('synthseg_parc', SYNTHSEG_PARC), ('aseg', PHANTOM)])
def test_identify_convention(convention, counts):
  ids, n = np.unique(label_map(counts), return_counts=True)
  assert L.identify_convention(ids, n) == convention
  summary = L.summarize_ids(ids, n)
  assert summary.convention == convention
  assert summary.unknown == {} and summary.unknown_fraction == 0.0
  assert set(counts) <= L.CONVENTIONS[convention] | L.CORTICAL_PARCEL_IDS


def test_identify_convention_ignores_zero_counts():
  assert L.identify_convention([0, 2, 1005, 77], [10, 5, 0, 0]) == 'aseg'
  assert L.identify_convention([0, 2, 1005, 77], [10, 5, 1, 0]) == 'synthseg_parc'


def test_summarize_ids_counts_unknown_ids_over_non_zero_voxels():
  summary = L.summarize_ids(np.array([0, 2, 999, 5000, -3]), np.array([100, 6, 3, 1, 2]))
  assert summary.unknown == {-3: 2, 999: 3, 5000: 1}
  assert summary.unknown_fraction == pytest.approx(6 / 12)
  assert summary.convention == 'aseg'
  assert L.summarize_ids(np.array([0]), np.array([8])).unknown_fraction == 0.0


def test_left_right_swap():
  assert L.LEFT_RIGHT_SWAP[1005] == 2005 and L.LEFT_RIGHT_SWAP[2035] == 1035
  assert L.LEFT_RIGHT_SWAP[11] == 50 and L.LEFT_RIGHT_SWAP[47] == 8
  assert L.LEFT_RIGHT_SWAP[12101] == 11101
  assert all(L.LEFT_RIGHT_SWAP[L.LEFT_RIGHT_SWAP[i]] == i for i in L.LEFT_RIGHT_SWAP)
  for name, ids in {**L.REGIONS, **L.EXTRA_REGIONS}.items():  # regions are mirror-symmetric
    assert {L.LEFT_RIGHT_SWAP.get(i, i) for i in ids} == set(ids), name
  ids = np.array([[0, 2, 41, 1005], [2005, 24, 251, 7777]], np.int16)
  swapped = L.swap_left_right_ids(ids)
  assert swapped.dtype == np.int16
  np.testing.assert_array_equal(swapped, [[0, 41, 2, 2005], [1005, 24, 251, 7777]])


def test_classes_count_parcels_as_cortex():
  classes = L.ids_to_classes(np.array([3, 1005, 11175 + 1000, 42, 2028, 11, 0, -1, 99999]))
  left, right = L.CLASS_IDS.index(3), L.CLASS_IDS.index(42)
  np.testing.assert_array_equal(classes, [left, left, right, right, right, 0, 0, 0, 0])
  np.testing.assert_array_equal(L.classes_to_ids(classes)[:4], [3, 3, 42, 42])
  np.testing.assert_array_equal(L.ids_to_classes(np.array(L.CLASS_IDS)), np.arange(L.NUM_CLASSES))
