"""Tests for progression.synthetic / progression.phantom: the simulated cohort's known answers."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from progression import (cohort_statistics, disease_model, io, phantom, phantom_atrophy,
                         synthetic)
from progression import labels as L
from progression.errors import ProgressionError

REPO = Path(__file__).resolve().parents[1]
# 64^3 at 2 mm: hippocampi ~130 voxels a side, so ~1.4 %/year is ~2 voxels a year (at 32^3 a
# year of CN atrophy is below one voxel and only the images, not the label maps, show it).
SHAPE, VOXEL_MM, SUBJECTS, VISITS = (64, 64, 64), 2.0, 12, 3
SMALL = dict(shape=(32, 32, 32), voxel_mm=4.0)


@pytest.fixture(scope='module')
def cohort(tmp_path_factory) -> Path:
  root = tmp_path_factory.mktemp('synthetic') / 'cohort'
  return synthetic.make_cohort(root, SUBJECTS, shape=SHAPE, voxel_mm=VOXEL_MM, n_visits=VISITS,
                               seed=0, workers=2)


def read_tsv(path: Path) -> pd.DataFrame:
  return pd.read_csv(path, sep='\t')


def baseline_diagnosis(root: Path) -> pd.Series:
  subjects = read_tsv(root / 'participants.tsv').participant_id
  return pd.Series({s: read_tsv(root / s / f'{s}_sessions.tsv').diagnosis.iloc[0]
                    for s in subjects})


def digests(root: Path) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob('*')) if p.is_file()}


def test_layout_and_clinical_tables(cohort):
  participants = read_tsv(cohort / 'participants.tsv')
  assert list(participants.columns) == ['participant_id', 'sex', 'education_level', 'apoe4']
  assert participants.participant_id.tolist() == [f'sub-{i:03d}' for i in range(1, 13)]
  assert set(participants.sex) <= {'F', 'M'} and set(participants.apoe4) <= {0, 1, 2}
  assert participants.education_level.between(6, 22).all()
  dx = baseline_diagnosis(cohort)
  assert dx.value_counts().to_dict() == {'CN': 5, 'MCI': 4, 'AD': 3}  # 40/35/25 %
  for subject, diagnosis in dx.items():
    sessions = read_tsv(cohort / subject / f'{subject}_sessions.tsv')
    assert list(sessions.columns) == ['session_id', 'age', 'diagnosis', 'MMSE', 'cdr_sb']
    assert sessions.session_id.tolist() == ['ses-M000', 'ses-M012', 'ses-M024']
    np.testing.assert_allclose(np.diff(sessions.age), 1.0, atol=0.011)
    assert 60 <= sessions.age.iloc[0] <= 90
    low, high = {'CN': (26, 30), 'MCI': (21, 30), 'AD': (12, 28)}[diagnosis]  # Stage-driven.
    assert low <= sessions.MMSE.iloc[0] <= high
    low, high = {'CN': (0, 2), 'MCI': (0, 5), 'AD': (1.5, 10)}[diagnosis]
    assert low <= sessions.cdr_sb.iloc[0] <= high
    assert sessions.MMSE.iloc[-1] <= sessions.MMSE.iloc[0] + 1             # declines
    assert set(sessions.diagnosis) <= ({'MCI', 'AD'} if diagnosis == 'MCI' else {diagnosis})
    for session in sessions.session_id:
      for suffix in ('T1w', 'dseg'):
        assert (cohort / subject / session / 'anat' / f'{subject}_{session}_{suffix}.nii.gz'
                ).is_file()
  description = json.loads((cohort / 'dataset_description.json').read_text())
  assert description['ProgressionSynthetic']['parameters']['shape'] == list(SHAPE)


def test_images_are_ras_centred_t1_like(cohort):
  image = io.load_image(cohort / 'sub-001/ses-M000/anat/sub-001_ses-M000_T1w.nii.gz')
  labels = io.load_labels(cohort / 'sub-001/ses-M000/anat/sub-001_ses-M000_dseg.nii.gz')
  expected = np.diag([VOXEL_MM] * 3 + [1.0])
  expected[:3, 3] = -(np.asarray(SHAPE) - 1) / 2 * VOXEL_MM
  np.testing.assert_allclose(image.affine, expected)
  centre = image.affine @ np.r_[(np.asarray(SHAPE) - 1) / 2, 1]
  np.testing.assert_allclose(centre[:3], 0.0)
  assert {2, 41, 3, 42, 4, 43, 10, 49, 17, 53, 18, 54, 24, 16} <= set(np.unique(labels.data))
  median = {name: np.median(image.data[np.isin(labels.data, ids)])
            for name, ids in [('wm', (2, 41)), ('gm', (3, 42)), ('csf', (24, 4, 43))]}
  assert median['wm'] > median['gm'] > median['csf']                     # T1 contrast
  # RAS+: the right hippocampus (53) lies at x > 0.
  x = np.nonzero(labels.data == L.RIGHT_HIPPOCAMPUS)[0].mean()
  assert (image.affine @ np.r_[x, 0, 0, 1])[0] > 0


def test_ground_truth_matches_label_maps(cohort):
  truth = read_tsv(cohort / 'ground_truth.tsv')
  assert len(truth) == SUBJECTS * VISITS
  expected = (['subject', 'session', 'years_from_first', 'stage']
              + [f'{r}_ml' for r in L.REGIONS] + ['intracranial_ml']
              + [f'{r}_annual_rate_pct' for r in synthetic.RATE_REGIONS]
              + [f'{r}_expected_rate_pct' for r in synthetic.RATE_REGIONS])
  assert list(truth.columns[:len(expected)]) == expected
  assert all(c.startswith('motion_') for c in truth.columns[len(expected):])
  for row in truth.itertuples():
    labels = io.load_labels(cohort / row.subject / row.session / 'anat' /
                            f'{row.subject}_{row.session}_dseg.nii.gz')
    for region, ids in L.REGIONS.items():
      volume = np.isin(labels.data, ids).sum() * labels.voxel_volume_ml
      assert getattr(row, f'{region}_ml') == pytest.approx(volume, abs=1e-5)
  np.testing.assert_allclose(truth.years_from_first, np.tile([0.0, 1.0, 2.0], SUBJECTS))


def test_measured_atrophy_follows_diagnosis_at_literature_rates(cohort):
  truth = read_tsv(cohort / 'ground_truth.tsv')
  dx = baseline_diagnosis(cohort)
  measured = {r: cohort_statistics.subject_rates(truth, r) for r in synthetic.RATE_REGIONS}
  target = truth.groupby('subject').first()
  hippocampus = measured['hippocampus'].groupby(dx).mean()
  assert 0 > hippocampus['CN'] > hippocampus['MCI'] > hippocampus['AD']  # loss CN < MCI < AD
  for diagnosis in ('CN', 'MCI', 'AD'):
    subjects = dx.index[dx == diagnosis]
    for region in ('hippocampus', 'lateral_ventricles', 'whole_brain'):
      true_rate = target.loc[subjects, f'{region}_annual_rate_pct'].mean()
      assert measured[region][subjects].mean() == pytest.approx(true_rate, rel=0.3), region
      mean_stage = disease_model.STAGE_PRIOR[diagnosis][0]
      literature = disease_model.rate_at_stage(region, mean_stage, diagnosis, 73.0, 0, None)
      assert true_rate == pytest.approx(literature, rel=0.35), region
  assert (measured['lateral_ventricles'] > 0).all()           # every subject's ventricles grow
  assert (measured['whole_brain'] < 0).all()                  # and brain shrinks
  ventricles = measured['lateral_ventricles'].groupby(dx).mean()
  assert ventricles['CN'] < ventricles['MCI'] < ventricles['AD']
  summary = cohort_statistics.summarize_cohort(cohort)
  assert summary.subjects.tolist() == [5, 4, 3]
  assert summary.hippocampus_measured['AD'] == pytest.approx(hippocampus['AD'])


def test_followup_deformation_is_diffeomorphic_and_composes():
  plan = next(p for p in synthetic.plan_cohort(3, 3, seed=1) if p.diagnosis == 'AD')
  visits = synthetic.simulate_subject(plan, SHAPE, VOXEL_MM, seed=1)
  for visit in visits[1:]:
    det = phantom_atrophy.jacobian_determinant(visit['displacement'], VOXEL_MM)
    assert det.min() > 0.5 and det.max() < 1.5
    assert det.min() < 0.995 and det.max() > 1.005                      # it does deform
  # Stationary velocity: phi_2 = phi_1 o phi_1 (to interpolation error, mm).
  anat = phantom.sample_anatomy(np.random.default_rng(0), 128.0)
  grid = phantom_atrophy.coarse_grid((64, 64, 64), 2.0)
  basis = phantom_atrophy.velocity_basis(anat, grid, [None, ('lateral_ventricle', 1)])
  velocity = -0.02 * basis[0] + 0.3 * basis[1]
  one, two = (phantom_atrophy.integrate(velocity, t, grid) for t in (1.0, 2.0))
  index = np.indices(one.shape[1:], dtype=np.float32)
  composed = one + phantom_atrophy.sample_linear(one, index + one / grid.spacing_mm)
  assert np.abs(two).max() > 1.0
  np.testing.assert_allclose(composed, two, atol=0.02 * np.abs(two).max())


def test_same_seed_same_bytes_any_workers_other_seed_differs(tmp_path):
  one = synthetic.make_cohort(tmp_path / 'a', 4, n_visits=2, seed=3, workers=1, **SMALL)
  two = synthetic.make_cohort(tmp_path / 'b', 4, n_visits=2, seed=3, workers=2, **SMALL)
  other = synthetic.make_cohort(tmp_path / 'c', 4, n_visits=2, seed=4, workers=1, **SMALL)
  assert digests(one) == digests(two)
  image = 'sub-001/ses-M012/anat/sub-001_ses-M012_T1w.nii.gz'
  assert digests(one)[image] != digests(other)[image]


def test_refuses_to_overwrite_and_reuses_complete_cohort(tmp_path):
  busy = tmp_path / 'busy'
  busy.mkdir()
  (busy / 'notes.txt').write_text('keep me')
  with pytest.raises(ProgressionError, match='busy: refusing .* not empty'):
    synthetic.make_cohort(busy, 2, n_visits=1, **SMALL)
  assert [p.name for p in busy.iterdir()] == ['notes.txt']
  done = synthetic.make_cohort(tmp_path / 'done', 2, n_visits=2, **SMALL)
  stamp = (done / 'ground_truth.tsv').stat().st_mtime_ns
  assert synthetic.make_cohort(done, 2, n_visits=2, **SMALL) == done      # same parameters
  assert (done / 'ground_truth.tsv').stat().st_mtime_ns == stamp
  with pytest.raises(ProgressionError, match=r'n_visits 2 there, 3 requested'):
    synthetic.make_cohort(done, 2, n_visits=3, **SMALL)
  (done / 'sub-002/ses-M012/anat/sub-002_ses-M012_T1w.nii.gz').unlink()
  with pytest.raises(ProgressionError, match='1 files are missing'):
    synthetic.make_cohort(done, 2, n_visits=2, **SMALL)
  with pytest.raises(ProgressionError, match='visit_interval_years'):
    synthetic.make_cohort(tmp_path / 'x', 2, visit_interval_years=0.01, **SMALL)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['busy', 'done']   # no .tmp- left


def test_interrupted_run_leaves_nothing_and_half_year_visits(tmp_path):
  def interrupt(done, total):
    if done == 2:
      raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    synthetic.make_cohort(tmp_path / 'c', 3, n_visits=2, progress=interrupt, **SMALL)
  assert list(tmp_path.iterdir()) == []
  root = synthetic.make_cohort(tmp_path / 'c', 2, n_visits=3, visit_interval_years=0.5,
                               **SMALL)
  sessions = read_tsv(root / 'sub-001/sub-001_sessions.tsv')
  assert sessions.session_id.tolist() == ['ses-M000', 'ses-M006', 'ses-M012']
  np.testing.assert_allclose(read_tsv(root / 'ground_truth.tsv').years_from_first,
                             [0, 0.5, 1.0] * 2)


def test_cli(tmp_path):
  command = [sys.executable, '-m', 'experiments.make_cohort', '--out', str(tmp_path / 'c'),
             '--subjects', '3', '--shape', '32,32,32', '--voxel-mm', '4', '--visits', '2']
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert 'hippocampus %/y measured' in done.stdout
  assert (tmp_path / 'c/sub-003/ses-M012/anat/sub-003_ses-M012_dseg.nii.gz').is_file()
  command[command.index('--visits') + 1] = '3'
  failed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert failed.returncode == 1
  assert failed.stderr.strip().splitlines()[-1].startswith('error: ')
  assert 'Traceback' not in failed.stderr


def test_label_counts_follow_the_true_deformation_at_real_size():
  """Hippocampal label-count rate vs the true deformation's, 1-year pairs at 2 mm, real size.

  The true follow-up volume is the baseline mask carried by the true map, sum_y m0(phi^-1 y)
  (trilinear), which needs neither the follow-up labels nor the calibration.
  """
  shape, voxel_mm = (96, 112, 96), 2.0
  differences = []
  for plan in synthetic.plan_cohort(8, 2, seed=5):
    baseline, followup = synthetic.simulate_subject(plan, shape, voxel_mm, seed=5)
    ids = (L.LEFT_HIPPOCAMPUS, L.RIGHT_HIPPOCAMPUS)
    mask = np.isin(baseline['labels'], ids).astype(np.float32)
    where = np.indices(shape, dtype=np.float32) + followup['displacement'] / voxel_mm
    carried = ndimage.map_coordinates(mask, where, order=1, mode='constant').sum()
    count_rate = 100.0 * (np.isin(followup['labels'], ids).sum() / mask.sum() - 1.0)
    differences.append(count_rate - 100.0 * (carried / mask.sum() - 1.0))
    assert mask.sum() * voxel_mm ** 3 / 1000 > 3.0                      # adult size, mL
  assert np.std(differences) < 0.3                                      # %/year
  assert abs(np.mean(differences)) < 0.3


def test_expected_rate_is_the_conditional_mean_of_the_true_rate():
  """Known answers of E[rate | observables]: unbiased, residual uncorrelated with what it saw."""
  rng = np.random.default_rng(0)
  draws = [disease_model.draw_baseline(rng, dx) for dx in ('CN', 'MCI', 'AD') * 700]
  expected = np.array([disease_model.expected_rates(b)['hippocampus'] for b in draws])
  true = np.array([b.rates['hippocampus'] for b in draws])
  residual = true - expected
  standard_error = residual.std() / np.sqrt(len(draws))
  assert abs(residual.mean()) < 3 * standard_error
  for observed in ([b.mmse for b in draws], [np.log(b.anatomy.hippocampus) for b in draws],
                   [b.cdrsb for b in draws], expected):
    assert abs(np.corrcoef(residual, observed)[0, 1]) < 0.08
  dx = np.array([b.diagnosis for b in draws])
  population = np.array([true[dx == d].mean() for d in dx])
  assert np.abs(residual).mean() < 0.75 * np.abs(true - population).mean()


def test_signal_statistics_against_numpy():
  rng = np.random.default_rng(1)
  signal = pd.DataFrame({'diagnosis': ['CN', 'AD'] * 10, 'stage': rng.normal(size=20),
                         **{c: rng.normal(size=20) for c in cohort_statistics.SIGNAL_COLUMNS}})
  table = cohort_statistics.signal_statistics(signal)
  ad = signal[signal.diagnosis == 'AD']
  assert table.loc['AD', 'subjects'] == 10 and table.loc['all', 'subjects'] == 20
  assert table.loc['AD', 'r(stage, mmse)'] == pytest.approx(
      np.corrcoef(ad.stage, ad.mmse)[0, 1])
  assert table.loc['all', 'r(stage, hippocampus_rate)'] == pytest.approx(
      np.corrcoef(signal.stage, signal.hippocampus_rate)[0, 1])


def test_cohort_holds_the_stage_signal(cohort):
  signal = cohort_statistics.baseline_signal(cohort)
  table = cohort_statistics.signal_statistics(signal)
  assert table.loc['all', 'r(stage, hippocampus_fraction)'] < -0.5
  assert table.loc['all', 'r(stage, lateral_ventricles_fraction)'] > 0.4
  assert table.loc['all', 'r(stage, mmse)'] < -0.7


def test_rigid_motion_between_visits_is_recorded():
  plan = synthetic.plan_cohort(1, 2, seed=2)[0]
  still, moved = (synthetic.simulate_subject(plan, (32, 32, 32), 6.0, seed=2, motion_mm=m)
                  for m in (0.0, 3.0))
  transform = moved[1]['motion']
  assert np.allclose(still[1]['motion'], np.eye(4)) and not np.allclose(transform, np.eye(4))
  assert np.abs(transform[:3, 3]).max() <= 3.0
  np.testing.assert_allclose(  # The ground truth's columns give the transform back.
      synthetic.motion_from_columns(synthetic.motion_columns(transform)), transform)
  world = phantom.world_grid((32, 32, 32), 6.0)

  def centroid(labels):  # World mm of the brain's centre of mass.
    inside = labels > 0
    return np.array([world[i][inside].mean() for i in range(3)])
  # Follow-up voxel x shows baseline point T x: T maps the moved centroid onto the still one.
  mapped = transform[:3, :3] @ centroid(moved[1]['labels']) + transform[:3, 3]
  np.testing.assert_allclose(mapped, centroid(still[1]['labels']), atol=1.0)
  assert np.linalg.norm(centroid(moved[1]['labels']) - centroid(still[1]['labels'])) > 0.5
