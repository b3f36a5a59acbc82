"""NIfTI in and out: load into canonical RAS+ float32 with the affine kept; atomic saves.

Array layout everywhere in this project: `[x, y, z]` voxel axes in RAS+ order
(x -> Right, y -> Anterior, z -> Superior); the affine maps voxel indices to world
millimetres. `Volume` keeps the file's own affine and shape too, so outputs can be
written back on the input's exact grid (`to_original`).
"""

import contextlib
import dataclasses
import gzip
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Callable, Mapping

import nibabel as nib
import numpy as np
from absl import logging

from progression import labels
from progression.errors import ProgressionError

PathLike = str | os.PathLike
# Files (or array names) whose unknown label ids were already reported.
_WARNED_UNKNOWN_IDS: set[str] = set()
_BINCOUNT_MAX = 1 << 16  # Largest value counted with np.bincount (else np.unique).


@dataclasses.dataclass(frozen=True)
class Volume:
  """A 3D image in canonical RAS+ voxel order.

  Attributes:
    data: `[x, y, z]` array (float32 for images, int32 for label maps).
    affine: 4x4 voxel -> world (mm) matrix of `data`.
    original_affine: 4x4 affine of the file as stored (before reorientation).
    original_shape: voxel shape of the file as stored.
    path: the file it came from, or None for in-memory volumes.
  """
  data: np.ndarray
  affine: np.ndarray
  original_affine: np.ndarray
  original_shape: tuple[int, int, int]
  path: str | None = None

  @property
  def voxel_size_mm(self) -> tuple[float, float, float]:
    """Voxel edge lengths in mm (column norms of the affine's 3x3 part)."""
    return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

  @property
  def voxel_volume_ml(self) -> float:
    """Volume of one voxel in millilitres (1 mL = 1000 mm^3)."""
    return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

  def to_original(self, data: np.ndarray) -> np.ndarray:
    """Reorients an array on this volume's canonical grid back to the file's voxel order."""
    return _reorient(data, _canonical_ornt(self.original_affine), inverse=True)


def from_array(data: np.ndarray, affine: np.ndarray, path: str | None = None) -> Volume:
  """Wraps an in-memory `[x, y, z]` array and affine as a canonical `Volume` (validated)."""
  where = path or '<array>'
  data = np.asarray(data)
  affine = np.asarray(affine, dtype=np.float64)
  _check_affine(affine, where)
  data = _squeeze_to_3d(data, where)
  _check_finite(data, where)
  ornt = _canonical_ornt(affine)
  canon = _reorient(data, ornt)
  canon_affine = affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
  return Volume(data=canon, affine=canon_affine, original_affine=affine,
                original_shape=tuple(int(s) for s in data.shape), path=path)


def load_image(path: PathLike) -> Volume:
  """Loads a 3D NIfTI intensity image as float32 in canonical RAS+ order.

  Raises:
    ProgressionError: naming the file, when it is missing, unreadable, corrupt or
      truncated, not 3D, holds NaN/inf voxels, or has a singular/non-finite affine.
  """
  data, affine = _read(path)
  volume = from_array(data.astype(np.float32, copy=False), affine, path=str(path))
  return volume


def load_labels(path: PathLike) -> Volume:
  """Loads a 3D NIfTI label map as int32 in canonical RAS+ order (checked by `check_label_map`).

  Raises:
    ProgressionError: as `load_image`, and as `check_label_map` (non-integer values; not a
      label map, e.g. a T1w image given as labels).
  """
  data, affine = _read(path)
  return from_array(check_label_map(data, str(path)), affine, path=str(path))


def check_label_map(data: np.ndarray, where: str) -> np.ndarray:
  """Checks that `data` is a label map with FreeSurfer/SynthSeg ids; returns it as int32.

  One pass over the ids (`np.bincount`, or `np.unique` for negative or very large values)
  gives each id's voxel count; `labels.summarize_ids` names the convention and the ids no
  convention knows (`labels.KNOWN_IDS`). Unknown ids on a minority of the non-zero voxels
  count in no region: a warning lists them with their voxel counts, once per `where`.

  Args:
    data: `[x, y, z]` array of ids (integer, or float holding integers).
    where: the file (or a name for an in-memory array) that error messages name.

  Raises:
    ProgressionError: naming `where`, when voxels are NaN/inf or not integers, or when more
      than `labels.MAX_UNKNOWN_FRACTION` of the non-zero voxels carry unknown ids (an
      intensity image, not a label map).
  """
  data = np.asarray(data)
  if not np.issubdtype(data.dtype, np.integer):
    if not np.all(np.isfinite(data)):
      raise ProgressionError(f'{where}: label map contains NaN or infinite voxels')
    rounded = np.rint(data)
    if np.any(np.abs(rounded - data) > 1e-3):
      raise ProgressionError(f'{where}: label map has non-integer voxel values (an intensity '
                             'image given as labels?)')
    data = rounded
  ids, counts = _id_counts(data)
  if ids.size and (ids[0] < np.iinfo(np.int32).min or ids[-1] > np.iinfo(np.int32).max):
    raise ProgressionError(f'{where}: not a label map: voxel values reach {ids[-1]} '
                           f'(FreeSurfer ids are 0-{labels.MAX_KNOWN_ID})')
  summary = labels.summarize_ids(ids, counts)
  if summary.unknown_fraction > labels.MAX_UNKNOWN_FRACTION:
    raise ProgressionError(
        f'{where}: not a label map: {100 * summary.unknown_fraction:.0f} % of the non-zero '
        f'voxels carry {len(summary.unknown)} ids that no known convention '
        f'({", ".join(labels.CONVENTIONS)}) uses (id: voxels {_some_ids(summary.unknown, 5)}); '
        'was an intensity image (e.g. the T1w) given as the labels?')
  if summary.unknown and where not in _WARNED_UNKNOWN_IDS:
    _WARNED_UNKNOWN_IDS.add(where)
    logging.warning(
        '%s: %d voxels (%.2g %% of the non-zero ones) carry label ids that no known convention '
        'uses, so they count in no region (map looks like %s); id: voxels = %s', where,
        sum(summary.unknown.values()), 100 * summary.unknown_fraction, summary.convention,
        _some_ids(summary.unknown, 20))
  return data.astype(np.int32, copy=False)


def _id_counts(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Distinct values of an integer-valued array (ascending; int64, float64 for floats
  beyond `_BINCOUNT_MAX` or below 0) and their voxel counts."""
  if data.size == 0:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  low, high = data.min(), data.max()
  if 0 <= low and high <= _BINCOUNT_MAX:
    counts = np.bincount(data.ravel().astype(np.intp, copy=False))
    ids = np.flatnonzero(counts)
    return ids.astype(np.int64), counts[ids].astype(np.int64)
  ids, counts = np.unique(data, return_counts=True)
  return ids.astype(np.float64 if ids.dtype.kind == 'f' else np.int64), counts.astype(np.int64)


def _some_ids(id_counts: Mapping[int, int], n: int) -> str:
  """'{id}: {count}, ...' for the `n` ids with the most voxels (then '... and k more')."""
  top = sorted(id_counts.items(), key=lambda kv: (-kv[1], kv[0]))
  text = ', '.join(f'{i}: {c}' for i, c in top[:n])
  return text + (f', ... and {len(top) - n} more' if len(top) > n else '')


def save_image(path: PathLike, data: np.ndarray, affine: np.ndarray,
               dtype: np.dtype | type = np.float32) -> Path:
  """Writes `data` (`[x, y, z]`, voxel order matching `affine`) as NIfTI, atomically.

  The file appears complete or not at all: it is written to a temporary file in
  the same folder and renamed. Parent folders are created. Returns the path.
  """
  data = np.asarray(data)
  affine = np.asarray(affine, dtype=np.float64)
  _check_affine(affine, str(path))
  if data.ndim != 3:
    raise ProgressionError(f'{path}: refusing to save a {data.ndim}D array; expected 3D')
  img = nib.Nifti1Image(data.astype(dtype), affine)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  img.header.set_xyzt_units('mm', 'sec')
  return _atomic_write(Path(path), lambda tmp: nib.save(img, tmp))


def save_labels(path: PathLike, data: np.ndarray, affine: np.ndarray) -> Path:
  """Writes an integer label map atomically (int16 on disk: FreeSurfer ids < 32768)."""
  return save_image(path, np.asarray(data), affine, dtype=np.int16)


def save_volume_like(path: PathLike, data: np.ndarray, reference: Volume,
                     dtype: np.dtype | type = np.float32) -> Path:
  """Saves `data` given on `reference`'s canonical grid with the reference file's own affine."""
  return save_image(path, reference.to_original(data), reference.original_affine, dtype=dtype)


def make_folder(path: PathLike, what: str = 'output folder') -> Path:
  """`mkdir -p` whose failures (a parent that is a file, no permission) name `path`.

  Raises:
    ProgressionError: '<path>: cannot create the <what>: <reason>'.
  """
  path = Path(path)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ProgressionError(f'{path}: cannot create the {what}: {e.strerror or e}') from None
  return path


def write_folder(out_dir: PathLike, writers: Mapping[str, Callable[[Path], None]]) -> list[Path]:
  """Writes a set of files into `out_dir`, all or nothing; returns their paths in order.

  `writers[name](path)` writes the file `name` at `path`; the LAST name is the set's
  completion marker. Everything is written into a hidden staging folder
  `.<out_dir name>.tmp-*` beside `out_dir`. When `out_dir` is absent the staging folder
  is renamed to it (one atomic step); otherwise the old marker is removed first, then
  the files move in one by one, the marker last. So a crash or `kill -9` leaves only
  complete files under their final names, and the marker only beside a complete set;
  a killed run can leave its staging folder behind (safe to delete). Other files in
  `out_dir` are kept: callers decide beforehand what may be replaced.

  Raises:
    ProgressionError: naming `out_dir` on OS errors (parent not writable, disk full).
  """
  out = Path(out_dir).absolute()
  names = list(writers)
  make_folder(out.parent, f'folder for {out}')
  try:
    staging = Path(tempfile.mkdtemp(prefix=f'.{out.name}.tmp-', dir=out.parent))
  except OSError as e:
    raise ProgressionError(f'{out}: cannot write to {out.parent}: {e.strerror or e}') from None
  try:
    for name, write in writers.items():
      write(staging / name)
    if not out.exists():
      os.chmod(staging, 0o777 & ~_current_umask())
      with contextlib.suppress(OSError):  # Made meanwhile: move the files in instead.
        staging.rename(out)
        return [out / name for name in names]
    (out / names[-1]).unlink(missing_ok=True)
    for name in names:
      os.replace(staging / name, out / name)
  except OSError as e:
    raise ProgressionError(f'{out}: cannot write the output files: {e.strerror or e}') from None
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return [out / name for name in names]


def write_text_atomic(path: PathLike, text: str) -> Path:
  """Writes `text` to `path` through a temporary file and a rename (complete or untouched)."""
  return _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def _atomic_write(path: Path, write) -> Path:
  """Runs `write(tmp)` on a temporary file beside `path`, then renames it onto `path`.

  The temporary file gets the usual permissions (0666 minus the umask; `mkstemp`
  alone would leave it owner-only) and is removed if the write fails, so `path`
  is either complete or untouched. OS errors (folder not creatable or not
  writable, disk full) become `ProgressionError`s naming the path.
  """
  make_folder(path.parent)
  if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
    raise ProgressionError(f'{path.parent}: output folder is not writable')
  suffix = ''.join(path.suffixes) or '.tmp'
  try:
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name.split(".")[0]}-', suffix=suffix,
                               dir=path.parent)
  except OSError as e:
    raise ProgressionError(f'{path}: cannot write to {path.parent}: {e}') from None
  os.close(fd)
  try:
    os.chmod(tmp, 0o666 & ~_current_umask())
    write(tmp)
    os.replace(tmp, path)
  except BaseException as e:
    Path(tmp).unlink(missing_ok=True)
    if isinstance(e, OSError):
      raise ProgressionError(f'{path}: cannot write file: {e}') from e
    raise
  return path


def _current_umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _read(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
  path = Path(path)
  if not path.is_file():
    raise ProgressionError(f'{path}: image file not found')
  try:
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
  except (EOFError, OSError, OverflowError, zlib.error, gzip.BadGzipFile, ValueError,
          nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError) as e:
    raise ProgressionError(f'{path}: cannot read NIfTI (corrupt or truncated file?): {e}') from None
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
    raise ProgressionError(f'{path}: not a NIfTI image ({type(img).__name__})')
  return data, np.asarray(img.affine, dtype=np.float64)


def _squeeze_to_3d(data: np.ndarray, where: str) -> np.ndarray:
  """Accepts [x,y,z] or [x,y,z,1]; never squeezes spatial axes (a 1-voxel slab stays 3D)."""
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise ProgressionError(f'{where}: expected a 3D image, got shape {tuple(data.shape)}')
  if min(data.shape) < 2:
    raise ProgressionError(f'{where}: expected a 3D volume, got a slab of shape {data.shape}')
  return data


def _check_finite(data: np.ndarray, where: str) -> None:
  if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    raise ProgressionError(f'{where}: {bad} voxels are NaN or infinite')


def _check_affine(affine: np.ndarray, where: str) -> None:
  if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
    raise ProgressionError(f'{where}: affine is not a finite 4x4 matrix')
  if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
    raise ProgressionError(f'{where}: affine is singular (zero voxel volume)')


def _canonical_ornt(affine: np.ndarray) -> np.ndarray:
  return nib.orientations.io_orientation(affine)


def _reorient(data: np.ndarray, ornt: np.ndarray, inverse: bool = False) -> np.ndarray:
  if inverse:
    # Undo: apply the inverse permutation/flips of `ornt`.
    ornt = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(('R', 'A', 'S')),
        nib.orientations.axcodes2ornt(nib.orientations.ornt2axcodes(ornt)))
  return np.ascontiguousarray(nib.orientations.apply_orientation(data, ornt))
