"""FreeSurfer / SynthSeg label ids and the anatomical regions built from them.

One place for label ids, so the synthetic phantom, augmentation (left/right
flips) and the volumetric evaluation all agree.
"""

import types

import numpy as np

BACKGROUND = 0
LEFT_CEREBRAL_WM = 2
LEFT_CORTEX = 3
LEFT_LATERAL_VENTRICLE = 4
LEFT_INF_LAT_VENTRICLE = 5
LEFT_THALAMUS = 10
THIRD_VENTRICLE = 14
FOURTH_VENTRICLE = 15
BRAINSTEM = 16
LEFT_HIPPOCAMPUS = 17
LEFT_AMYGDALA = 18
CSF = 24
RIGHT_CEREBRAL_WM = 41
RIGHT_CORTEX = 42
RIGHT_LATERAL_VENTRICLE = 43
RIGHT_INF_LAT_VENTRICLE = 44
RIGHT_THALAMUS = 49
RIGHT_HIPPOCAMPUS = 53
RIGHT_AMYGDALA = 54

# Left id -> right id; midline structures (CSF, 3rd/4th ventricle, brainstem) map to themselves.
_LEFT_RIGHT_PAIRS = (
    (LEFT_CEREBRAL_WM, RIGHT_CEREBRAL_WM),
    (LEFT_CORTEX, RIGHT_CORTEX),
    (LEFT_LATERAL_VENTRICLE, RIGHT_LATERAL_VENTRICLE),
    (LEFT_INF_LAT_VENTRICLE, RIGHT_INF_LAT_VENTRICLE),
    (LEFT_THALAMUS, RIGHT_THALAMUS),
    (LEFT_HIPPOCAMPUS, RIGHT_HIPPOCAMPUS),
    (LEFT_AMYGDALA, RIGHT_AMYGDALA),
)
LEFT_RIGHT_SWAP: types.MappingProxyType = types.MappingProxyType(
    {**{l: r for l, r in _LEFT_RIGHT_PAIRS}, **{r: l for l, r in _LEFT_RIGHT_PAIRS}})

# Region name -> label ids summed into it. Whole brain excludes CSF and ventricles.
REGIONS: types.MappingProxyType = types.MappingProxyType({
    'hippocampus': (LEFT_HIPPOCAMPUS, RIGHT_HIPPOCAMPUS),
    'amygdala': (LEFT_AMYGDALA, RIGHT_AMYGDALA),
    'lateral_ventricles': (LEFT_LATERAL_VENTRICLE, RIGHT_LATERAL_VENTRICLE),
    'thalamus': (LEFT_THALAMUS, RIGHT_THALAMUS),
    'cortex': (LEFT_CORTEX, RIGHT_CORTEX),
    'cerebral_wm': (LEFT_CEREBRAL_WM, RIGHT_CEREBRAL_WM),
    'csf': (CSF,),
    'whole_brain': (LEFT_CEREBRAL_WM, RIGHT_CEREBRAL_WM, LEFT_CORTEX, RIGHT_CORTEX,
                    LEFT_THALAMUS, RIGHT_THALAMUS, LEFT_HIPPOCAMPUS, RIGHT_HIPPOCAMPUS,
                    LEFT_AMYGDALA, RIGHT_AMYGDALA, BRAINSTEM),
})
# Optional extension of the lateral ventricles with the inferior lateral horns.
LATERAL_VENTRICLES_WITH_INFERIOR = (LEFT_LATERAL_VENTRICLE, RIGHT_LATERAL_VENTRICLE,
                                    LEFT_INF_LAT_VENTRICLE, RIGHT_INF_LAT_VENTRICLE)

# Label ids the models see as classes (index = position); ids not listed become class 0.
CLASS_IDS: tuple[int, ...] = (
    BACKGROUND, LEFT_CEREBRAL_WM, LEFT_CORTEX, LEFT_LATERAL_VENTRICLE, LEFT_INF_LAT_VENTRICLE,
    LEFT_THALAMUS, THIRD_VENTRICLE, FOURTH_VENTRICLE, BRAINSTEM, LEFT_HIPPOCAMPUS,
    LEFT_AMYGDALA, CSF, RIGHT_CEREBRAL_WM, RIGHT_CORTEX, RIGHT_LATERAL_VENTRICLE,
    RIGHT_INF_LAT_VENTRICLE, RIGHT_THALAMUS, RIGHT_HIPPOCAMPUS, RIGHT_AMYGDALA)
NUM_CLASSES = len(CLASS_IDS)


def ids_to_classes(label_ids: np.ndarray) -> np.ndarray:
  """Maps a FreeSurfer label map to class indices into `CLASS_IDS` (uint8; unknown ids -> 0)."""
  lookup = np.zeros(max(CLASS_IDS) + 1, dtype=np.uint8)
  lookup[list(CLASS_IDS)] = np.arange(NUM_CLASSES, dtype=np.uint8)
  ids = np.asarray(label_ids)
  inside = (ids >= 0) & (ids < lookup.size)
  return np.where(inside, lookup[np.clip(ids, 0, lookup.size - 1)], 0).astype(np.uint8)


def classes_to_ids(classes: np.ndarray) -> np.ndarray:
  """Inverse of `ids_to_classes` for class-index maps (int32 FreeSurfer ids)."""
  return np.asarray(CLASS_IDS, dtype=np.int32)[np.asarray(classes)]


def left_right_class_permutation() -> np.ndarray:
  """Class index -> class index of the mirrored structure (for left-right flips)."""
  return np.array([CLASS_IDS.index(LEFT_RIGHT_SWAP.get(i, i)) for i in CLASS_IDS], dtype=np.uint8)
