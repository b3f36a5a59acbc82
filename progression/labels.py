"""FreeSurfer / SynthSeg label ids, the anatomical regions built from them, conventions.

One place for label ids, so the synthetic phantom, augmentation (left/right flips),
the volumetric evaluation and the label-map checks of `progression.io` all agree.

Label-map conventions we read (all use FreeSurfer's colour-table ids):
- 'aseg': FreeSurfer's aseg.mgz: cortex 3/42, subcortical and cerebellar structures, plus
  ids SynthSeg never writes (vessel 30/62, choroid plexus 31/63, 5th ventricle 72,
  WM hypointensities 77 (78/79), non-WM hypointensities 80 (81/82), optic chiasm 85,
  corpus callosum 251-255). The synthetic phantom writes a subset of aseg's ids.
- 'aparc+aseg': aseg with the cortex split into Desikan(-Killiany/DKT) parcels
  1000-1035 (ctx-lh-*) and 2000-2035 (ctx-rh-*), or Destrieux parcels 11100-11175 /
  12100-12175 (aparc.a2009s+aseg); a few unassigned cortex voxels may keep 3/42.
- 'synthseg': SynthSeg's 32 structures (aseg's ids without the FreeSurfer-only ones);
  its CSF 24 covers the extracerebral CSF.
- 'synthseg_parc': SynthSeg --parc: cortex 3/42 replaced by the Desikan parcels.
Every region counts the same tissue whatever the convention: 'cortex' includes the
parcels, 'cerebral_wm' the corpus callosum and WM hypointensities (which aseg carves
out of the white matter).
"""

import dataclasses
import types
from collections.abc import Iterable, Mapping

import numpy as np

BACKGROUND = 0
LEFT_CEREBRAL_WM = 2
LEFT_CORTEX = 3
LEFT_LATERAL_VENTRICLE = 4
LEFT_INF_LAT_VENTRICLE = 5
LEFT_CEREBELLUM_WM = 7
LEFT_CEREBELLUM_CORTEX = 8
LEFT_THALAMUS = 10
LEFT_CAUDATE = 11
LEFT_PUTAMEN = 12
LEFT_PALLIDUM = 13
THIRD_VENTRICLE = 14
FOURTH_VENTRICLE = 15
BRAINSTEM = 16
LEFT_HIPPOCAMPUS = 17
LEFT_AMYGDALA = 18
CSF = 24
LEFT_ACCUMBENS = 26
LEFT_VENTRAL_DC = 28
LEFT_VESSEL = 30
LEFT_CHOROID_PLEXUS = 31
RIGHT_CEREBRAL_WM = 41
RIGHT_CORTEX = 42
RIGHT_LATERAL_VENTRICLE = 43
RIGHT_INF_LAT_VENTRICLE = 44
RIGHT_CEREBELLUM_WM = 46
RIGHT_CEREBELLUM_CORTEX = 47
RIGHT_THALAMUS = 49
RIGHT_CAUDATE = 50
RIGHT_PUTAMEN = 51
RIGHT_PALLIDUM = 52
RIGHT_HIPPOCAMPUS = 53
RIGHT_AMYGDALA = 54
RIGHT_ACCUMBENS = 58
RIGHT_VENTRAL_DC = 60
RIGHT_VESSEL = 62
RIGHT_CHOROID_PLEXUS = 63
FIFTH_VENTRICLE = 72
WM_HYPOINTENSITIES = 77
LEFT_WM_HYPOINTENSITIES = 78
RIGHT_WM_HYPOINTENSITIES = 79
NON_WM_HYPOINTENSITIES = 80
LEFT_NON_WM_HYPOINTENSITIES = 81
RIGHT_NON_WM_HYPOINTENSITIES = 82
OPTIC_CHIASM = 85
CORPUS_CALLOSUM = (251, 252, 253, 254, 255)  # CC posterior, mid-posterior, central, ...

# Cortical parcels: Desikan-Killiany / DKT (aparc+aseg, SynthSeg --parc; 1000/2000 =
# 'unknown') and Destrieux (aparc.a2009s+aseg). Left id + offset = right id.
LEFT_DK_PARCELS = tuple(range(1000, 1036))
RIGHT_DK_PARCELS = tuple(range(2000, 2036))
LEFT_DESTRIEUX_PARCELS = tuple(range(11100, 11176))
RIGHT_DESTRIEUX_PARCELS = tuple(range(12100, 12176))
LEFT_CORTICAL_PARCELS = LEFT_DK_PARCELS + LEFT_DESTRIEUX_PARCELS
RIGHT_CORTICAL_PARCELS = RIGHT_DK_PARCELS + RIGHT_DESTRIEUX_PARCELS

# Left id -> right id; midline structures (CSF, 3rd/4th/5th ventricle, brainstem, CC,
# optic chiasm, WM hypointensities 77) map to themselves.
_LEFT_RIGHT_PAIRS = (
    (LEFT_CEREBRAL_WM, RIGHT_CEREBRAL_WM),
    (LEFT_CORTEX, RIGHT_CORTEX),
    (LEFT_LATERAL_VENTRICLE, RIGHT_LATERAL_VENTRICLE),
    (LEFT_INF_LAT_VENTRICLE, RIGHT_INF_LAT_VENTRICLE),
    (LEFT_CEREBELLUM_WM, RIGHT_CEREBELLUM_WM),
    (LEFT_CEREBELLUM_CORTEX, RIGHT_CEREBELLUM_CORTEX),
    (LEFT_THALAMUS, RIGHT_THALAMUS),
    (LEFT_CAUDATE, RIGHT_CAUDATE),
    (LEFT_PUTAMEN, RIGHT_PUTAMEN),
    (LEFT_PALLIDUM, RIGHT_PALLIDUM),
    (LEFT_HIPPOCAMPUS, RIGHT_HIPPOCAMPUS),
    (LEFT_AMYGDALA, RIGHT_AMYGDALA),
    (LEFT_ACCUMBENS, RIGHT_ACCUMBENS),
    (LEFT_VENTRAL_DC, RIGHT_VENTRAL_DC),
    (LEFT_VESSEL, RIGHT_VESSEL),
    (LEFT_CHOROID_PLEXUS, RIGHT_CHOROID_PLEXUS),
    (LEFT_WM_HYPOINTENSITIES, RIGHT_WM_HYPOINTENSITIES),
    (LEFT_NON_WM_HYPOINTENSITIES, RIGHT_NON_WM_HYPOINTENSITIES),
    *zip(LEFT_CORTICAL_PARCELS, RIGHT_CORTICAL_PARCELS),
)
LEFT_RIGHT_SWAP: types.MappingProxyType = types.MappingProxyType(
    {**{l: r for l, r in _LEFT_RIGHT_PAIRS}, **{r: l for l, r in _LEFT_RIGHT_PAIRS}})

_CORTEX = (LEFT_CORTEX, RIGHT_CORTEX) + LEFT_CORTICAL_PARCELS + RIGHT_CORTICAL_PARCELS
_CEREBRAL_WM = (LEFT_CEREBRAL_WM, RIGHT_CEREBRAL_WM, WM_HYPOINTENSITIES, LEFT_WM_HYPOINTENSITIES,
                RIGHT_WM_HYPOINTENSITIES) + CORPUS_CALLOSUM
# Deep grey matter besides hippocampus and amygdala (FreeSurfer's SubCortGray minus those).
SUBCORTICAL_GM = (LEFT_THALAMUS, RIGHT_THALAMUS, LEFT_CAUDATE, RIGHT_CAUDATE, LEFT_PUTAMEN,
                  RIGHT_PUTAMEN, LEFT_PALLIDUM, RIGHT_PALLIDUM, LEFT_ACCUMBENS, RIGHT_ACCUMBENS,
                  LEFT_VENTRAL_DC, RIGHT_VENTRAL_DC)
CEREBELLUM = (LEFT_CEREBELLUM_WM, RIGHT_CEREBELLUM_WM, LEFT_CEREBELLUM_CORTEX,
              RIGHT_CEREBELLUM_CORTEX)
_OTHER_TISSUE = (BRAINSTEM, OPTIC_CHIASM, NON_WM_HYPOINTENSITIES, LEFT_NON_WM_HYPOINTENSITIES,
                 RIGHT_NON_WM_HYPOINTENSITIES)

# Region name -> label ids summed into it. Whole brain = all brain tissue: cerebral WM and
# cortex (parcels included), hippocampus, amygdala, subcortical grey matter, cerebellum,
# brainstem, optic chiasm and hypointensities; it excludes CSF, the ventricles, vessels
# and choroid plexus (FreeSurfer's BrainSegNotVent, up to those last two).
REGIONS: types.MappingProxyType = types.MappingProxyType({
    'hippocampus': (LEFT_HIPPOCAMPUS, RIGHT_HIPPOCAMPUS),
    'amygdala': (LEFT_AMYGDALA, RIGHT_AMYGDALA),
    'lateral_ventricles': (LEFT_LATERAL_VENTRICLE, RIGHT_LATERAL_VENTRICLE),
    'thalamus': (LEFT_THALAMUS, RIGHT_THALAMUS),
    'cortex': _CORTEX,
    'cerebral_wm': _CEREBRAL_WM,
    'csf': (CSF,),
    'whole_brain': tuple(sorted(set(
        _CEREBRAL_WM + _CORTEX + SUBCORTICAL_GM + CEREBELLUM + _OTHER_TISSUE
        + (LEFT_HIPPOCAMPUS, RIGHT_HIPPOCAMPUS, LEFT_AMYGDALA, RIGHT_AMYGDALA)))),
})
# Regions real segmentations have but the synthetic phantom does not (so not in `REGIONS`,
# whose regions every cohort's maps carry): pass them as extra `regions` where wanted.
EXTRA_REGIONS: types.MappingProxyType = types.MappingProxyType({
    'subcortical_gm': SUBCORTICAL_GM,
    'cerebellum': CEREBELLUM,
})
# Optional extension of the lateral ventricles with the inferior lateral horns.
LATERAL_VENTRICLES_WITH_INFERIOR = (LEFT_LATERAL_VENTRICLE, RIGHT_LATERAL_VENTRICLE,
                                    LEFT_INF_LAT_VENTRICLE, RIGHT_INF_LAT_VENTRICLE)

# ----------------------------------------------------------------------------- conventions

SYNTHSEG_IDS = frozenset((
    BACKGROUND, LEFT_CEREBRAL_WM, LEFT_CORTEX, LEFT_LATERAL_VENTRICLE, LEFT_INF_LAT_VENTRICLE,
    LEFT_CEREBELLUM_WM, LEFT_CEREBELLUM_CORTEX, LEFT_THALAMUS, LEFT_CAUDATE, LEFT_PUTAMEN,
    LEFT_PALLIDUM, THIRD_VENTRICLE, FOURTH_VENTRICLE, BRAINSTEM, LEFT_HIPPOCAMPUS, LEFT_AMYGDALA,
    CSF, LEFT_ACCUMBENS, LEFT_VENTRAL_DC, RIGHT_CEREBRAL_WM, RIGHT_CORTEX,
    RIGHT_LATERAL_VENTRICLE, RIGHT_INF_LAT_VENTRICLE, RIGHT_CEREBELLUM_WM,
    RIGHT_CEREBELLUM_CORTEX, RIGHT_THALAMUS, RIGHT_CAUDATE, RIGHT_PUTAMEN, RIGHT_PALLIDUM,
    RIGHT_HIPPOCAMPUS, RIGHT_AMYGDALA, RIGHT_ACCUMBENS, RIGHT_VENTRAL_DC))
# Ids FreeSurfer's aseg writes and SynthSeg never does: their presence says "FreeSurfer".
FREESURFER_ONLY_IDS = frozenset((
    LEFT_VESSEL, RIGHT_VESSEL, LEFT_CHOROID_PLEXUS, RIGHT_CHOROID_PLEXUS, FIFTH_VENTRICLE,
    WM_HYPOINTENSITIES, LEFT_WM_HYPOINTENSITIES, RIGHT_WM_HYPOINTENSITIES,
    NON_WM_HYPOINTENSITIES, LEFT_NON_WM_HYPOINTENSITIES, RIGHT_NON_WM_HYPOINTENSITIES,
    OPTIC_CHIASM) + CORPUS_CALLOSUM)
ASEG_IDS = SYNTHSEG_IDS | FREESURFER_ONLY_IDS
CORTICAL_PARCEL_IDS = frozenset(LEFT_CORTICAL_PARCELS + RIGHT_CORTICAL_PARCELS)
# Convention name -> the ids its maps may hold.
CONVENTIONS: types.MappingProxyType = types.MappingProxyType({
    'aseg': ASEG_IDS,
    'aparc+aseg': ASEG_IDS | CORTICAL_PARCEL_IDS,
    'synthseg': SYNTHSEG_IDS,
    'synthseg_parc': SYNTHSEG_IDS | frozenset(LEFT_DK_PARCELS + RIGHT_DK_PARCELS),
})
KNOWN_IDS = frozenset().union(*CONVENTIONS.values())
MAX_KNOWN_ID = max(KNOWN_IDS)
# A map whose non-zero voxels are more than this fraction unknown ids is no label map.
MAX_UNKNOWN_FRACTION = 0.5


@dataclasses.dataclass(frozen=True)
class IdSummary:
  """What a label map's ids say about it (see `summarize_ids`).

  Attributes:
    convention: one of `CONVENTIONS` (see `identify_convention`).
    unknown: id -> voxel count, for ids no convention knows (ascending ids).
    unknown_fraction: voxels with unknown ids / non-zero voxels (0 for an empty map).
  """
  convention: str
  unknown: Mapping[int, int]
  unknown_fraction: float


def identify_convention(ids: Iterable[int], counts: Iterable[int] | None = None) -> str:
  """Names the convention of a label map from the ids it holds (see the module docstring).

  Args:
    ids: distinct label ids of the map (e.g. from `np.unique`).
    counts: voxel count of each id (same order); ids with a zero count are ignored.

  Returns:
    'aparc+aseg' or 'synthseg_parc' when cortical parcels are present, else 'aseg' or
    'synthseg'; FreeSurfer-only ids (`FREESURFER_ONLY_IDS`) mean FreeSurfer, and a map
    without them is SynthSeg when it has SynthSeg's caudate and cerebellum (SynthSeg
    always labels them), else 'aseg' (a subset of aseg's ids, e.g. the synthetic phantom).
  """
  ids = [int(i) for i in ids]
  if counts is not None:
    ids = [i for i, n in zip(ids, counts) if n > 0]
  present = frozenset(ids)
  freesurfer = bool(present & FREESURFER_ONLY_IDS)
  if present & CORTICAL_PARCEL_IDS:
    return 'aparc+aseg' if freesurfer else 'synthseg_parc'
  synthseg_signature = ({LEFT_CAUDATE, RIGHT_CAUDATE} & present
                        and {LEFT_CEREBELLUM_CORTEX, RIGHT_CEREBELLUM_CORTEX} & present)
  return 'synthseg' if synthseg_signature and not freesurfer else 'aseg'


def summarize_ids(ids: np.ndarray, counts: np.ndarray) -> IdSummary:
  """Convention and unknown ids of a label map given its distinct ids and voxel counts.

  Args:
    ids: `[n]` distinct integer ids (e.g. `np.unique(labels, return_counts=True)`).
    counts: `[n]` voxel count of each id.
  """
  ids = np.asarray(ids, dtype=np.int64)
  counts = np.asarray(counts, dtype=np.int64)
  keep = counts > 0
  ids, counts = ids[keep], counts[keep]
  known = np.isin(ids, np.fromiter(KNOWN_IDS, dtype=np.int64))
  unknown = {int(i): int(n) for i, n in zip(ids[~known], counts[~known])}
  nonzero = int(counts[ids != BACKGROUND].sum())
  fraction = sum(unknown.values()) / nonzero if nonzero else 0.0
  return IdSummary(identify_convention(ids[known]), unknown, fraction)


def id_counts(label_ids: np.ndarray) -> np.ndarray:
  """Voxel count per id, `[MAX_KNOWN_ID + 1]` at least (indexable by any known id).

  `label_ids` must hold non-negative integers (a label map as `io.load_labels` returns).
  """
  return np.bincount(np.asarray(label_ids).ravel().astype(np.intp), minlength=MAX_KNOWN_ID + 1)


def swap_left_right_ids(label_ids: np.ndarray) -> np.ndarray:
  """Relabels each left structure as its right twin and vice versa (1xxx <-> 2xxx too).

  For a map mirrored across the midline; midline and unknown ids are kept.
  """
  ids = np.asarray(label_ids)
  inside = (ids >= 0) & (ids <= MAX_KNOWN_ID)
  swapped = _SWAP_LOOKUP[np.clip(ids, 0, MAX_KNOWN_ID).astype(np.intp)]
  return np.where(inside, swapped, ids).astype(ids.dtype)


def _swap_lookup() -> np.ndarray:
  lookup = np.arange(MAX_KNOWN_ID + 1, dtype=np.int64)
  pairs = np.array(list(LEFT_RIGHT_SWAP.items()), dtype=np.int64)
  lookup[pairs[:, 0]] = pairs[:, 1]
  lookup.setflags(write=False)
  return lookup


_SWAP_LOOKUP = _swap_lookup()


# ----------------------------------------------------------------------------- model classes

# Label ids the models see as classes (index = position); ids not listed become class 0,
# except cortical parcels, which become their hemisphere's cortex class.
CLASS_IDS: tuple[int, ...] = (
    BACKGROUND, LEFT_CEREBRAL_WM, LEFT_CORTEX, LEFT_LATERAL_VENTRICLE, LEFT_INF_LAT_VENTRICLE,
    LEFT_THALAMUS, THIRD_VENTRICLE, FOURTH_VENTRICLE, BRAINSTEM, LEFT_HIPPOCAMPUS,
    LEFT_AMYGDALA, CSF, RIGHT_CEREBRAL_WM, RIGHT_CORTEX, RIGHT_LATERAL_VENTRICLE,
    RIGHT_INF_LAT_VENTRICLE, RIGHT_THALAMUS, RIGHT_HIPPOCAMPUS, RIGHT_AMYGDALA)
NUM_CLASSES = len(CLASS_IDS)


def _class_lookup() -> np.ndarray:
  lookup = np.zeros(MAX_KNOWN_ID + 1, dtype=np.uint8)
  lookup[list(LEFT_CORTICAL_PARCELS)] = CLASS_IDS.index(LEFT_CORTEX)
  lookup[list(RIGHT_CORTICAL_PARCELS)] = CLASS_IDS.index(RIGHT_CORTEX)
  lookup[list(CLASS_IDS)] = np.arange(NUM_CLASSES, dtype=np.uint8)
  lookup.setflags(write=False)
  return lookup


_CLASS_LOOKUP = _class_lookup()


def ids_to_classes(label_ids: np.ndarray) -> np.ndarray:
  """Maps a FreeSurfer label map to class indices into `CLASS_IDS` (uint8).

  Cortical parcels become their hemisphere's cortex class; other ids not in
  `CLASS_IDS` become 0 (background).
  """
  ids = np.asarray(label_ids)
  inside = (ids >= 0) & (ids < _CLASS_LOOKUP.size)
  return np.where(inside, _CLASS_LOOKUP[np.clip(ids, 0, _CLASS_LOOKUP.size - 1)],
                  0).astype(np.uint8)


def classes_to_ids(classes: np.ndarray) -> np.ndarray:
  """Inverse of `ids_to_classes` for class-index maps (int32 FreeSurfer ids; parcels -> 3/42)."""
  return np.asarray(CLASS_IDS, dtype=np.int32)[np.asarray(classes)]


def left_right_class_permutation() -> np.ndarray:
  """Class index -> class index of the mirrored structure (for left-right flips)."""
  return np.array([CLASS_IDS.index(LEFT_RIGHT_SWAP.get(i, i)) for i in CLASS_IDS], dtype=np.uint8)
