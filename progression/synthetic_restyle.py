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
  (1001.. / 2001..), so `labels.REGIONS['cortex']` measures the same voxels;
- optionally (`header_motion_mm`) moves every follow-up visit's head by a random rigid
  transform written into its affines only: the voxels stay those of the source, so a
  pipeline run on the copy differs from one on the source only by what registration and
  resampling do (the simulator's `motion_mm` re-renders the moved head, with new noise).

Tables are copied; the ground truth's motion columns (follow-up -> baseline world transform)
take the header motion. The source is read only.
"""

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from progression import labels, synthetic
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
                   parcellate: bool = True, header_motion_mm: float = 0.0, seed: int = 0
                   ) -> Path:
  """Copies the cohort `source` to `out` (absent or empty), restyled as the module says.

  Args:
    las_share: share of the subjects (every k-th, in sorted order) stored LAS.
    parcellate: split the cortex of every label map (`*_dseg.nii.gz`) into parcels.
    header_motion_mm: rotations (degrees) and translations (mm) of each follow-up visit's
      header motion, uniform in +-header_motion_mm; 0: none.
    seed: seeds the header motion.

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
  if not 0.0 <= header_motion_mm <= 10.0:
    raise ProgressionError(f'header_motion_mm must be in [0, 10], got {header_motion_mm}')
  tmp = out.with_name(f'.{out.name}.tmp')
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(source, tmp)
  subjects = sorted(p for p in tmp.glob('sub-*') if p.is_dir())
  las = {s for i, s in enumerate(subjects)  # Evenly spread: 0.5 -> every second subject.
         if np.floor((i + 1) * las_share) > np.floor(i * las_share)}
  motion = _header_motions(subjects, header_motion_mm, seed)
  for subject in subjects:
    for path in sorted(subject.glob('ses-*/anat/*.nii.gz')):
      image = nib.load(path)
      transform = motion.get((subject.name, path.parent.parent.name))
      if transform is not None:
        image = _moved(image, transform)
      if parcellate and path.name.endswith('_dseg.nii.gz'):
        data = parcellate_cortex(np.asarray(image.dataobj).astype(np.int16), image.affine)
        header = image.header.copy()
        header.set_data_dtype(np.int16)  # Parcel ids exceed uint8.
        image = nib.Nifti1Image(data, image.affine, header)
      if subject in las:
        image = store_las(image)
      nib.save(image, path)
  if motion:
    _record_motion(tmp / 'ground_truth.tsv', motion)
  if out.exists():
    out.rmdir()
  tmp.replace(out)
  return out


def _header_motions(subjects: list[Path], motion_mm: float, seed: int
                    ) -> dict[tuple[str, str], np.ndarray]:
  """(subject, session) -> 4x4 world transform of each follow-up visit (none for baselines)."""
  if motion_mm <= 0:
    return {}
  out = {}
  for index, subject in enumerate(subjects):
    sessions = sorted(p.name for p in subject.glob('ses-*') if p.is_dir())
    for number, session in enumerate(sessions[1:], start=1):
      rng = np.random.default_rng([seed, index, number])
      out[(subject.name, session)] = synthetic.rigid_motion(rng, motion_mm)
  return out


def _moved(image: nib.Nifti1Image, transform: np.ndarray) -> nib.Nifti1Image:
  """The same voxels placed `transform` away in world space (affine only)."""
  affine = transform @ image.affine
  out = nib.Nifti1Image(np.asanyarray(image.dataobj), affine, image.header)
  out.set_qform(affine, code=1)
  out.set_sform(affine, code=1)
  return out


def _record_motion(ground_truth: Path, motion: dict[tuple[str, str], np.ndarray]) -> None:
  """Composes the header motion into the ground truth's follow-up -> baseline transforms."""
  if not ground_truth.is_file():
    return
  table = pd.read_csv(ground_truth, sep='\t')
  for i, row in table.iterrows():
    transform = motion.get((row['subject'], row['session']))
    if transform is None:
      continue
    before = synthetic.motion_from_columns(row)
    for name, value in synthetic.motion_columns(before @ np.linalg.inv(transform)).items():
      table.loc[i, name] = value
  table.to_csv(ground_truth, sep='\t', index=False, float_format='%.6f')
