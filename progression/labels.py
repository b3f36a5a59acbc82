"""FreeSurfer / SynthSeg label ids and the anatomical regions built from them.

One place for label ids, so the synthetic phantom, augmentation (left/right
flips) and the volumetric evaluation all agree.
"""

import types

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
