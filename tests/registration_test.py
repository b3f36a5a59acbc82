"""Rigid follow-up -> baseline registration: known motion, failure check, cache, integration.

Phantom heads at 48x56x48 voxels of 2 mm (the head is shrunk to fit), 2 visits, rigid motion
up to 3 mm / 3 degrees from the simulator (`motion_mm`), whose true transform is known.
"""

import dataclasses
import os

import numpy as np
import pytest

from progression import (cohort, cohort_spec, covariates, input_pipeline, io, labels, phantom,
                         preprocess, registration, synthetic)
from progression.errors import ProgressionError
from progression.evaluation import baselines, report

SHAPE = (48, 56, 48)
VOXEL_MM = 2.0
SEED = 3
REGISTER = cohort_spec.RegistrationSpec(enabled=True, on_failure='error')


def _volumes(visits, k):
  affine = phantom.grid_affine(SHAPE, VOXEL_MM)
  return (io.from_array(visits[k]['image'].astype(np.float32), affine),
          io.from_array(visits[k]['labels'].astype(np.int32), affine))


@dataclasses.dataclass(frozen=True)
class Subject:
  """One phantom subject simulated without and with motion (same seed: same anatomy, noise)."""
  baseline: io.Volume
  baseline_labels: io.Volume
  followup: io.Volume  # Moved.
  still_followup: io.Volume  # The same follow-up scan without motion.
  motion: np.ndarray  # Simulator: moved follow-up world -> baseline world (mm).

  def brain_mm(self) -> np.ndarray:
    """World points (mm) `[n, 3]` of the baseline's labelled voxels."""
    affine = self.baseline.affine
    return np.argwhere(self.baseline_labels.data > 0) @ affine[:3, :3].T + affine[:3, 3]


@pytest.fixture(scope='module')
def subject():
  [plan] = synthetic.plan_cohort(1, 2, seed=SEED)
  moved = synthetic.simulate_subject(plan, SHAPE, VOXEL_MM, seed=SEED, motion_mm=3.0)
  still = synthetic.simulate_subject(plan, SHAPE, VOXEL_MM, seed=SEED, motion_mm=0.0)
  baseline, baseline_labels = _volumes(moved, 0)
  return Subject(baseline=baseline, baseline_labels=baseline_labels,
                 followup=_volumes(moved, 1)[0], still_followup=_volumes(still, 1)[0],
                 motion=moved[1]['motion'])


@pytest.fixture(scope='module')
def subject_files(subject, tmp_path_factory):
  """Baseline and moved follow-up as NIfTI files (so registrations are cached), and a cache."""
  folder = tmp_path_factory.mktemp('subject')
  paths = {name: str(io.save_image(folder / f'{name}.nii.gz', volume.data, volume.affine))
           for name, volume in (('base', subject.baseline), ('good', subject.followup))}
  return paths, folder / 'cache'


@pytest.fixture(scope='module')
def cohorts(tmp_path_factory):
  """The same 2-subject x 2-visit cohort made without and with motion (same seed)."""
  root = tmp_path_factory.mktemp('registration')
  made = {}
  for name, motion_mm in (('still', 0.0), ('moved', 3.0)):
    made[name] = synthetic.make_cohort(root / name, n_subjects=2, shape=SHAPE,
                                       voxel_mm=VOXEL_MM, n_visits=2, seed=SEED, workers=1,
                                       motion_mm=motion_mm)
  return made


@pytest.fixture(scope='module')
def cache_root(tmp_path_factory):
  """Shared by the cohort tests: `<root>/registration` holds each pair's registration once."""
  return tmp_path_factory.mktemp('cache')


def _pairs(root):
  return cohort.make_pairs(cohort.read_visits(cohort.load_spec('synthetic'), root))


def test_recovers_known_motion_within_half_a_mm_and_degree(subject, subject_files):
  truth = np.linalg.inv(subject.motion)  # Simulator: follow-up -> baseline; ours: the inverse.
  brain = subject.brain_mm()
  moved_mm, _ = registration.discrepancy(truth, np.eye(4), brain)
  assert 1.0 <= moved_mm <= 6.0 and 1.0 <= registration.rotation_angle_deg(truth) <= 5.2
  # The same scan with and without motion: only the motion to find.
  same_scan = registration.register_checked(subject.still_followup, subject.followup)
  error_mm, error_deg = registration.discrepancy(same_scan.transform.fixed_to_moving, truth,
                                                 brain)
  assert error_mm < 0.5 and error_deg < 0.5, (error_mm, error_deg)
  assert same_scan.ok and same_scan.correlation > 0.95 and same_scan.inverse_mm < 0.5
  # Baseline -> follow-up: atrophy and a new bias field move the rigid optimum of this small
  # head by ~0.6 mm / 0.6 degree even without motion (0.1 mm at real size, 96x112x96 at
  # 2 mm); the motion adds no more than 0.5 mm / 0.5 degree on top of it.
  paths, cache = subject_files
  pair = registration.register_cached(io.load_image(paths['base']),
                                      io.load_image(paths['good']), cache)
  unmoved, _ = registration.register_rigid(subject.baseline, subject.still_followup)
  expected = truth @ unmoved.fixed_to_moving
  error_mm, error_deg = registration.discrepancy(pair.transform.fixed_to_moving, expected,
                                                 brain)
  assert error_mm < 0.5 and error_deg < 0.5, (error_mm, error_deg)
  assert pair.ok and pair.inverse_mm < 0.5


def test_a_known_world_shift_is_recovered_and_undone(subject):
  baseline, baseline_labels = subject.baseline, subject.baseline_labels
  # The same voxels with a world shift of 2 mm right and a 2-degree turn about z.
  turn = np.radians(2.0)
  shift = np.eye(4)
  shift[:2, :2] = [[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]]
  shift[:3, 3] = [2.0, 0.0, 0.0]
  moved = dataclasses.replace(baseline, affine=shift @ baseline.affine)
  transform, _ = registration.register_rigid(baseline, moved)
  error_mm, error_deg = registration.discrepancy(transform.fixed_to_moving, shift,
                                                 subject.brain_mm())
  assert error_mm < 0.3 and error_deg < 0.3, (error_mm, error_deg)
  # Re-expressed in the fixed world, the moved image lands back on the baseline's voxels.
  back = registration.onto_fixed_grid(moved, transform, baseline)
  inside = baseline_labels.data > 0
  gap = np.abs(back.data[inside] - baseline.data[inside]).mean()
  assert gap < 0.05 * baseline.data[inside].mean()


def test_a_follow_up_turned_180_degrees_fails_the_check_and_is_named(subject, subject_files,
                                                                     tmp_path):
  paths, cache = subject_files
  followup = subject.followup
  turned = io.save_image(tmp_path / 'turned.nii.gz', followup.data[::-1, ::-1], followup.affine)
  # Refused (naming the follow-up file and why) or skipped (the good pair kept).
  pairs = _pairs_table(paths['base'], [paths['good'], str(turned)])
  with pytest.raises(ProgressionError, match=r'1 of 2 pairs failed registration: .*turned\.nii'
                                             r'\.gz: rigid registration to its baseline .*base'
                                             r'.*edge correlation after alignment 0\.[0-7]'):
    registration.register_pairs(pairs, cache, 'error')
  kept, found = registration.register_pairs(pairs, cache, 'skip')
  assert kept['followup_image'].tolist() == [paths['good']] and len(found) == 1


def _pairs_table(baseline_path, followup_paths):
  import pandas as pd
  return pd.DataFrame({'baseline_image': [baseline_path] * len(followup_paths),
                       'followup_image': followup_paths})


def test_cache_is_used_on_the_second_call_and_renewed_when_a_file_changes(subject, tmp_path,
                                                                          monkeypatch):
  baseline, followup = subject.baseline, subject.followup
  base = io.load_image(io.save_image(tmp_path / 'b.nii.gz', baseline.data, baseline.affine))
  follow = io.load_image(io.save_image(tmp_path / 'f.nii.gz', followup.data, followup.affine))
  calls = []
  found = registration.Registration(registration.RigidTransform(np.diag([1.0, 1, 1, 1])),
                                    metric=-0.9, correlation=0.96, inverse_mm=0.1,
                                    inverse_deg=0.05, seconds=1.0)
  monkeypatch.setattr(registration, 'register_checked',
                      lambda *a, **k: calls.append(1) or found)
  first = registration.register_cached(base, follow, tmp_path / 'cache')
  second = registration.register_cached(base, follow, tmp_path / 'cache')
  assert len(calls) == 1 and len(list((tmp_path / 'cache').glob('*.json'))) == 1
  np.testing.assert_array_equal(first.transform.fixed_to_moving,
                                second.transform.fixed_to_moving)
  assert second == dataclasses.replace(first, transform=second.transform) and second.ok
  stat = os.stat(follow.path)  # A rewritten follow-up (new mtime) is registered again.
  os.utime(follow.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  registration.register_cached(base, follow, tmp_path / 'cache')
  assert len(calls) == 2 and not list((tmp_path / 'cache').glob('.*'))  # No temporary left.


def test_registered_follow_up_labels_match_the_unmoved_ones(cohorts, cache_root):
  still, moved = _pairs(cohorts['still']), _pairs(cohorts['moved'])
  identity = registration.RigidTransform(np.eye(4))
  for (_, a), (_, b) in zip(still.iterrows(), moved.iterrows()):
    baseline = io.load_image(b['baseline_image'])
    found = registration.register_cached(baseline, io.load_image(b['followup_image']),
                                         cache_root / 'registration')
    moved_labels = io.load_labels(b['followup_labels'])
    unmoved = io.load_labels(a['followup_labels']).data
    for region in ('hippocampus', 'lateral_ventricles', 'thalamus'):
      ids = labels.REGIONS[region]
      dice = []
      for transform in (found.transform, identity):
        resampled = registration.onto_fixed_grid(moved_labels, transform, baseline,
                                                 labels=True).data
        n_moved, n_still = np.isin(resampled, ids).sum(), np.isin(unmoved, ids).sum()
        assert abs(n_moved - n_still) <= max(0.03 * n_still, 8), (region, n_moved, n_still)
        overlap = np.isin(resampled, ids) & np.isin(unmoved, ids)
        dice.append(2 * overlap.sum() / (n_moved + n_still))
      # Registered: overlap limited by nearest-neighbour resampling of ~100-voxel regions.
      assert dice[0] > 0.65 and dice[0] > dice[1] + 0.1, (region, dice)


def test_evaluation_of_the_moved_cohort_matches_the_unmoved_one(cohorts, cache_root):
  method = [baselines.NoChangeBaseline('labels')]
  still = report.evaluate_pairs(_pairs(cohorts['still']), method).rows
  moved_pairs = _pairs(cohorts['moved'])
  registered = report.evaluate_pairs(moved_pairs, method, registration_spec=REGISTER,
                                     registration_cache_dir=cache_root / 'registration').rows
  unregistered = report.evaluate_pairs(moved_pairs, method).rows  # Same grid: not refused.
  for region in ('hippocampus', 'lateral_ventricles', 'whole_brain'):
    errors = [rows.loc[rows['region'] == region, 'abs_error_ml'].mean()
              for rows in (still, registered)]
    assert abs(errors[1] - errors[0]) <= 0.1 * errors[0], (region, errors)
  mse = [rows['mse_brain'].mean() for rows in (still, registered, unregistered)]
  assert mse[1] < 1.5 * mse[0] and mse[2] > 3 * mse[0], mse


def test_training_pairs_are_registered_before_gridding(cohorts, cache_root, tmp_path):
  grid = preprocess.Grid((40, 48, 40), (2.0, 2.0, 2.0))
  still, moved = _pairs(cohorts['still']), _pairs(cohorts['moved'])
  normalizer = covariates.fit_normalizer([cohort.covariates_of(r) for _, r in still.iterrows()])
  make = lambda pairs, spec, folder: input_pipeline.PairDataset(
      pairs, grid, folder, normalizer, registration_spec=spec)
  reference = make(still, None, tmp_path / 'still')
  registered = make(moved, REGISTER, cache_root)  # Registrations in cache_root/registration.
  unregistered = make(moved, dataclasses.replace(REGISTER, enabled=False), tmp_path / 'moved')
  assert len(list((cache_root / 'registration').glob('*.json'))) == len(moved)
  for i in range(len(still)):
    truth = reference.example(i)['followup']
    gaps = [np.abs(d.example(i)['followup'] - truth).mean() for d in (registered, unregistered)]
    assert gaps[0] < 0.5 * gaps[1], gaps
    assert np.array_equal(registered.example(i)['baseline'], reference.example(i)['baseline'])


def test_spec_registration_option(tmp_path):
  assert not cohort_spec.load_spec('clinica_bids').registration.enabled  # Clinica outputs align.
  assert cohort_spec.load_spec('adnimerge').registration == REGISTER
  assert not cohort_spec.load_spec('synthetic').registration.enabled
  text = (cohort_spec.COHORTS_DIR / 'synthetic.toml').read_text()
  bad = tmp_path / 'bad.toml'
  bad.write_text(text.replace('on_failure = "error"       # "error"', 'on_failure = "warn" #'))
  with pytest.raises(ProgressionError, match=r'bad\.toml \[registration\]: on_failure = '
                                             r"'warn' is not one of"):
    cohort_spec.load_spec(bad)
  absent = tmp_path / 'absent.toml'
  absent.write_text(text[:text.index('[registration]')])
  assert cohort_spec.load_spec(absent).registration == cohort_spec.RegistrationSpec()


def test_inverse_consistency_tolerance_scales_with_the_voxels(subject):
  """A 1.2 mm forward/backward disagreement fails at 1 mm voxels, passes at 3 mm ones."""
  baseline = subject.baseline
  forward = registration.RigidTransform(np.eye(4))
  off = np.eye(4)
  off[0, 3] = 1.2
  backward = registration.RigidTransform(off)
  for voxel_mm, fails in ((1.0, True), (3.0, False)):
    affine = baseline.affine.copy()
    affine[:3, :3] *= voxel_mm / min(baseline.voxel_size_mm)
    volume = dataclasses.replace(baseline, affine=affine)
    result = registration.check(volume, volume, forward, backward)
    assert result['inverse_mm'] == pytest.approx(1.2, abs=1e-6)
    assert (result['failure'] is not None) == fails, voxel_mm
