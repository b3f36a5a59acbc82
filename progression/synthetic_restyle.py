"""Restyles a synthetic cohort the way real cohorts arrive: mixed storage, parcellated cortex.

`synthetic.make_cohort` writes every image RAS+ with an aseg-style label map. Real data
converted by Clinica come stored LAS or LPS for some scanners, and FreeSurfer's aparc+aseg
splits the cortex (3/42) into parcels (1000s left, 2000s right). `restyle_cohort` copies a
cohort and, on the copy,

- stores a share of the subjects LAS: the voxel array flipped along its first axis and the
  affine changed to match, so every voxel keeps its world position (mm) and volumes, and a
  pipeline that honours affines sees the same anatomy;
- replaces each hemisphere's cortex label by `PARCELS` parcels: sectors of azimuth around the
  hemisphere's cortical centroid (world mm), above and below it, with DK-range ids
  (1001.. / 2001..), so `labels.REGIONS['cortex']` measures the same voxels.

Tables (participants, sessions, ground truth) are copied unchanged. The source is read only.
"""

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from progression import labels
from progression.errors import ProgressionError

AZIMUTH_SECTORS = 8
PARCELS = 2 * AZIMUTH_SECTORS  # Per hemisphere: azimuth sectors x (above, below).
_HEMISPHERE_PARCEL_BASE = {labels.LEFT_CORTEX: 1001, labels.RIGHT_CORTEX: 2001}


def store_las(image: nib.Nifti1Image) -> nib.Nifti1Image:
  """The same image in world space, its first voxel axis reversed (RAS+ -> LAS)."""
  data = np.asanyarray(image.dataobj)[::-1]
  affine = image.affine.copy()
  affine[:3, 3] = image.affine[:3, 3] + image.affine[:3, 0] * (image.shape[0] - 1)
  affine[:3, 0] = -image.affine[:3, 0]
  out = nib.Nifti1Image(np.ascontiguousarray(data), affine, image.header)
  out.set_qform(affine, code=1)
  out.set_sform(affine, code=1)
  return out


def parcellate_cortex(label_map: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """aparc+aseg-style copy of an aseg-style map: cortex 3/42 split into parcels (see module)."""
  out = label_map.copy()
  for cortex_id, base in _HEMISPHERE_PARCEL_BASE.items():
    index = np.argwhere(label_map == cortex_id)
    if len(index) == 0:
      continue
    world = index @ affine[:3, :3].T + affine[:3, 3]
    offset = world - world.mean(axis=0)
    azimuth = np.arctan2(offset[:, 1], offset[:, 0])
    sector = np.minimum(((azimuth + np.pi) / (2 * np.pi) * AZIMUTH_SECTORS).astype(int),
                        AZIMUTH_SECTORS - 1)
    parcel = base + sector + AZIMUTH_SECTORS * (offset[:, 2] < 0)
    out[tuple(index.T)] = parcel
  return out


def restyle_cohort(source: str | os.PathLike, out: str | os.PathLike, las_share: float = 0.5,
                   parcellate: bool = True) -> Path:
  """Copies the cohort `source` to `out` (absent or empty), restyled as the module says.

  Args:
    las_share: share of the subjects (every k-th, in sorted order) stored LAS.
    parcellate: split the cortex of every label map (`*_dseg.nii.gz`) into parcels.

  Raises:
    ProgressionError: `source` is no cohort folder, or `out` is not empty.
  """
  source, out = Path(source), Path(out)
  if not (source / 'participants.tsv').is_file():
    raise ProgressionError(f'{source}: not a cohort folder (no participants.tsv)')
  if out.exists() and any(out.iterdir()):
    raise ProgressionError(f'{out}: exists and is not empty')
  if not 0.0 <= las_share <= 1.0:
    raise ProgressionError(f'las_share must be in [0, 1], got {las_share}')
  tmp = out.with_name(f'.{out.name}.tmp')
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(source, tmp)
  subjects = sorted(p for p in tmp.glob('sub-*') if p.is_dir())
  las = {s for i, s in enumerate(subjects)  # Evenly spread: 0.5 -> every second subject.
         if np.floor((i + 1) * las_share) > np.floor(i * las_share)}
  for subject in subjects:
    for path in sorted(subject.glob('ses-*/anat/*.nii.gz')):
      image = nib.load(path)
      if parcellate and path.name.endswith('_dseg.nii.gz'):
        data = parcellate_cortex(np.asarray(image.dataobj).astype(np.int16), image.affine)
        header = image.header.copy()
        header.set_data_dtype(np.int16)  # Parcel ids exceed uint8.
        image = nib.Nifti1Image(data, image.affine, header)
      if subject in las:
        image = store_las(image)
      nib.save(image, path)
  if out.exists():
    out.rmdir()
  tmp.replace(out)
  return out
