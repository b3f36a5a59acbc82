"""Tests for progression.synthetic_restyle: LAS storage and parcellated cortex change no volume."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from progression import cohort, io, labels, synthetic, synthetic_restyle
from progression.errors import ProgressionError
from progression.evaluation import volumes


def test_restyled_cohort_keeps_anatomy_and_volumes(synthetic_cohort, tmp_path):
  out = synthetic_restyle.restyle_cohort(synthetic_cohort, tmp_path / 'real', las_share=0.5)
  before = cohort.read_visits(cohort.load_spec('synthetic'), synthetic_cohort)
  after = cohort.read_visits(cohort.load_spec('synthetic'), out)
  codes = {(v.subject, nib.aff2axcodes(nib.load(v.image_path).affine),
            nib.aff2axcodes(nib.load(v.labels_path).affine)) for v in after.itertuples()}
  las = {s for s, image, label_map in codes if image == label_map == ('L', 'A', 'S')}
  assert len(las) == after.subject.nunique() // 2
  assert all(image == label_map == ('R', 'A', 'S') for s, image, label_map in codes
             if s not in las)
  for old, new in zip(before.itertuples(), after.itertuples()):
    a, b = io.load_image(old.image_path), io.load_image(new.image_path)
    np.testing.assert_array_equal(a.data, b.data)  # loaded canonical: the same voxels
    np.testing.assert_allclose(a.affine, b.affine)
    old_labels, new_labels = io.load_labels(old.labels_path), io.load_labels(new.labels_path)
    ids = np.unique(new_labels.data)
    assert labels.LEFT_CORTEX not in ids and labels.RIGHT_CORTEX not in ids
    assert len([i for i in ids if 1000 < i < 1100]) == synthetic_restyle.PARCELS
    # DK parcels (SynthSeg --parc style: the phantom has none of aseg's FreeSurfer-only ids).
    assert labels.identify_convention(ids) in ('aparc+aseg', 'synthseg_parc')
    assert volumes.regional_volumes_ml(new_labels.data, new_labels.voxel_volume_ml) == (
        pytest.approx(volumes.regional_volumes_ml(old_labels.data, old_labels.voxel_volume_ml)))
  # The source is untouched.
  assert all(nib.aff2axcodes(nib.load(p).affine) == ('R', 'A', 'S') for p in before.image_path)


def test_refuses_bad_arguments(synthetic_cohort, tmp_path):
  with pytest.raises(ProgressionError, match='not a cohort'):
    synthetic_restyle.restyle_cohort(tmp_path, tmp_path / 'x')
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'file').write_text('x')
  with pytest.raises(ProgressionError, match='not empty'):
    synthetic_restyle.restyle_cohort(synthetic_cohort, tmp_path / 'full')


def test_header_motion_moves_follow_up_affines_and_is_recorded(synthetic_cohort, tmp_path):
  out = synthetic_restyle.restyle_cohort(synthetic_cohort, tmp_path / 'moved', las_share=0.0,
                                         parcellate=False, header_motion_mm=3.0, seed=1)
  truth = pd.read_csv(out / 'ground_truth.tsv', sep='\t').set_index(['subject', 'session'])
  before = cohort.read_visits(cohort.load_spec('synthetic'), synthetic_cohort)
  after = cohort.read_visits(cohort.load_spec('synthetic'), out)
  first = before.groupby('subject').session.transform('min')
  moved = 0
  for old, new, is_first in zip(before.itertuples(), after.itertuples(), before.session == first):
    for old_path, new_path in ((old.image_path, new.image_path),
                               (old.labels_path, new.labels_path)):
      a, b = nib.load(old_path), nib.load(new_path)
      np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
      if is_first:
        np.testing.assert_array_equal(a.affine, b.affine)
        continue
      # The recorded follow-up -> baseline transform takes each voxel's new world position
      # back to the one it had (the source has no motion).
      row = truth.loc[(new.subject, new.session)]
      t = synthetic.motion_from_columns(row)
      np.testing.assert_allclose(t @ b.affine, a.affine, atol=1e-4)
      header_motion = b.affine @ np.linalg.inv(a.affine)
      assert np.allclose(header_motion[:3, :3] @ header_motion[:3, :3].T, np.eye(3), atol=1e-5)
      assert 0 < np.abs(header_motion[:3, 3]).max() <= 3.0 + 1e-6  # mm, in world space
      angle = np.arccos(np.clip((np.trace(header_motion[:3, :3]) - 1) / 2, -1, 1))
      assert 0 < angle <= np.deg2rad(3.0 * np.sqrt(3))  # three rotations of <= 3 degrees
      moved += 1
  assert moved == 2 * int((before.session != first).sum())
  with pytest.raises(ProgressionError, match='header_motion_mm'):
    synthetic_restyle.restyle_cohort(synthetic_cohort, tmp_path / 'x', header_motion_mm=-1.0)
