"""Simulated longitudinal cohort whose true atrophy is known (Clinica BIDS + label maps).

Each subject is a procedural phantom (`progression.phantom`) with clinical covariates. Its
follow-ups are the baseline anatomy carried by a known smooth diffeomorphism phi_t = exp(t v):
one stationary velocity field v (mm/year) per subject, a sum of
- a whole-brain radial contraction, uniform inside the brain and fading to zero across the
  CSF shell (the skull does not move; extracerebral CSF grows);
- Gaussian-windowed radial contraction/expansion fields on each hippocampus, amygdala and
  lateral ventricle (window = the structure's ellipsoid, 1.25 x its semi-axes),
integrated by scaling and squaring on a coarse grid (~6 mm at real size) and upsampled. The
follow-up image at x renders the continuous phantom at phi_t^-1(x) (exact partial-volume
rendering instead of resampling the baseline, so no interpolation blur).

Each visit is a new scan: a new smooth bias field, a global intensity gain (log-sd
`GAIN_SD`) and new Rician noise; optionally (`motion_mm`) the head moves rigidly between
visits, up to `motion_mm` mm and `motion_mm` degrees, with the true transform in
ground_truth.tsv.

Rates are compound: V(t) = V(0) (1 + rate/100)^t, the convention of
`progression.evaluation.volumes.annualized_percent_change`. Who progresses how fast, and how
much of it a forecaster can read at baseline, is `progression.disease_model` (a latent
disease stage drives baseline anatomy, scores and rates). The coefficients of v are
calibrated per subject (`progression.atrophy_calibration`) so the volumes *measured on the
rendered follow-up label maps* follow the subject's rates to about a voxel. Deep structures are labelled
count-exact (`phantom._count_exact`): a hippocampus's label count is its continuous volume
to half a voxel, so on a 2 mm grid the label-count annual rate agrees with the true
deformation's Jacobian-integrated rate to an SD of ~0.2 %/year over 1-year pairs
(tests/synthetic_test.py measures it);
what remains is the half-voxel rounding and the coarse velocity grid's Jacobian.
"""

import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

import progression
from progression import io
from progression import labels as L
from progression import atrophy_calibration
from progression import disease_model
from progression import phantom
from progression import phantom_atrophy
from progression import workers as worker_pool
from progression.errors import ProgressionError

DIAGNOSES = disease_model.DIAGNOSES
DIAGNOSIS_FRACTIONS = disease_model.DIAGNOSIS_FRACTIONS
RATE_REGIONS = disease_model.RATE_REGIONS  # Regions with true and expected rate columns.
NOISE_FRACTION = 0.03  # Rician noise std / WM intensity.
GAIN_SD = 0.05  # Log-sd of the global intensity gain of each visit (scanner drift).


@dataclasses.dataclass(frozen=True)
class Visit:
  """One session: time since baseline (years), age (years) and clinical scores."""
  session: str
  years: float
  age_years: float
  diagnosis: str
  mmse: int
  cdrsb: float


@dataclasses.dataclass(frozen=True)
class SubjectPlan:
  """A subject's baseline draw (`disease_model.Baseline`), visits and rates (%/year).

  `rates`: the true annual rates (region -> signed compound %/year); `expected_rates`: their
  expectation given the baseline observables (`disease_model.expected_rates`).
  """
  index: int
  participant_id: str
  baseline: disease_model.Baseline
  expected_rates: dict
  visits: tuple[Visit, ...]

  @property
  def diagnosis(self) -> str:
    return self.baseline.diagnosis

  @property
  def rates(self) -> dict:
    return self.baseline.rates

  @property
  def sex(self) -> str:
    return self.baseline.sex


def visit_months(n_visits: int, interval_years: float) -> list[int]:
  """Months since baseline of each visit: round(12 * k * interval_years)."""
  return [int(round(12 * k * interval_years)) for k in range(n_visits)]


def plan_cohort(n_subjects: int, n_visits: int, seed: int,
                interval_years: float = 1.0) -> list[SubjectPlan]:
  """Draws every subject's covariates and rates (diagnosis mix CN/MCI/AD ~ 40/35/25 %)."""
  counts = np.floor(np.asarray(DIAGNOSIS_FRACTIONS) * n_subjects).astype(int)
  remainder = np.asarray(DIAGNOSIS_FRACTIONS) * n_subjects - counts
  counts[np.argsort(-remainder, kind='stable')[:n_subjects - counts.sum()]] += 1
  diagnoses = np.repeat(DIAGNOSES, counts)
  diagnoses = np.random.default_rng(np.random.SeedSequence([seed, 1])).permutation(diagnoses)
  months = visit_months(n_visits, interval_years)
  width = max(3, len(str(n_subjects)))
  return [_plan_subject(i, f'sub-{i + 1:0{width}d}', str(dx), months, seed)
          for i, dx in enumerate(diagnoses)]


def _plan_subject(index: int, participant_id: str, dx: str, months: list[int],
                  seed: int) -> SubjectPlan:
  rng = np.random.default_rng(np.random.SeedSequence([seed, 0, index, 0]))
  baseline = disease_model.draw_baseline(rng, dx)
  conversion = rng.uniform(0.5, 4.0) if baseline.converter else math.inf
  visits = []
  for m in months:
    t = m / 12.0
    mmse, cdrsb = disease_model.score_trajectory(baseline, t, conversion, rng)
    visits.append(Visit(f'ses-M{m:03d}', t, round(baseline.age_years + t, 2),
                        'AD' if t >= conversion else dx, mmse, cdrsb))
  return SubjectPlan(index, participant_id, baseline, disease_model.expected_rates(baseline),
                     tuple(visits))


# ------------------------------------------------------------------------- simulation

def simulate_subject(plan: SubjectPlan, shape: tuple[int, int, int], voxel_mm: float,
                     seed: int, motion_mm: float = 0.0) -> list[dict]:
  """Renders every visit of one subject.

  Args:
    motion_mm: largest rigid head motion of a follow-up relative to the baseline: each
      translation component up to this many mm, each rotation up to this many degrees
      (uniform draws); 0 = none.

  Returns:
    per visit: {'labels': int16 [x,y,z], 'image': int16 [x,y,z] (scanner units, WM ~1000),
    'displacement': [3,x,y,z] float32 mm of phi_t^-1 - identity (zeros at baseline),
    'motion': 4x4 world (mm) transform from this visit's scanner space to the baseline's
    (identity at baseline)}.
  """
  streams = np.random.SeedSequence([seed, 0, plan.index, 1]).spawn(2 + len(plan.visits))
  fov_mm = [n * voxel_mm for n in shape]
  anat = phantom.sample_anatomy(np.random.default_rng(streams[0]), fov_mm,
                                plan.baseline.anatomy, plan.baseline.head_scale)
  world = phantom.world_grid(shape, voxel_mm)
  labels0, mu0 = phantom.render(anat, phantom.anatomical_coordinates(anat, world), voxel_mm)
  scanner = np.random.default_rng(streams[1])
  sigma = NOISE_FRACTION * anat.gain * float(np.exp(scanner.normal(0.0, 0.1)))
  years = [v.years for v in plan.visits[1:]]
  motions = [np.eye(4)] + [rigid_motion(scanner, motion_mm) for _ in years]
  followups = atrophy_calibration.calibrate_followups(anat, world, voxel_mm, labels0, years,
                                                     plan.rates) if years else []
  visits = []
  for k, stream in enumerate(streams[2:]):
    if k == 0:
      labels, mu, displacement = labels0, mu0, np.zeros_like(world)
    else:
      labels, mu, displacement, r = followups[k - 1]
      if motion_mm > 0:  # The moved head: this visit's voxel x shows baseline-space T x.
        moved = _apply(motions[k], world)
        r = phantom.anatomical_coordinates(anat, moved + _sample_mm(displacement, moved,
                                                                     voxel_mm))
        labels, mu = phantom.render(anat, r, voxel_mm)
      elif mu is None:
        labels, mu = phantom.render(anat, r, voxel_mm)
    visit_rng = np.random.default_rng(stream)
    bias = phantom.bias_field(visit_rng, shape)
    gain = np.float32(np.exp(visit_rng.normal(0.0, GAIN_SD))) if k else np.float32(1.0)
    noisy = phantom.rician(visit_rng, mu * bias * gain, sigma)
    image = np.clip(np.rint(noisy), 0, np.iinfo(np.int16).max).astype(np.int16)
    visits.append({'labels': labels, 'image': image, 'displacement': displacement,
                   'motion': motions[k]})
  return visits


def rigid_motion(rng: np.random.Generator, motion_mm: float) -> np.ndarray:
  """A 4x4 rigid transform: rotations and translations uniform in +-motion_mm (deg, mm)."""
  if motion_mm <= 0:
    return np.eye(4)
  angles = np.deg2rad(rng.uniform(-motion_mm, motion_mm, size=3))
  cx, cy, cz = np.cos(angles)
  sx, sy, sz = np.sin(angles)
  rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
  ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
  rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
  transform = np.eye(4)
  transform[:3, :3] = rz @ ry @ rx
  transform[:3, 3] = rng.uniform(-motion_mm, motion_mm, size=3)
  return transform


def _apply(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
  """A 4x4 transform applied to world points `[3, ...]` (mm), float32."""
  flat = points.reshape(3, -1).astype(np.float64)
  moved = transform[:3, :3] @ flat + transform[:3, 3:4]
  return moved.reshape(points.shape).astype(np.float32)


def _sample_mm(displacement: np.ndarray, points: np.ndarray, voxel_mm: float) -> np.ndarray:
  """A displacement `[3, x, y, z]` on the centred image grid sampled at world points (mm)."""
  shape = np.asarray(displacement.shape[1:], np.float32).reshape(3, *([1] * (points.ndim - 1)))
  where = points / np.float32(voxel_mm) + 0.5 * (shape - 1)
  return phantom_atrophy.sample_linear(displacement, where)


# ------------------------------------------------------------------------- writing

FORMAT_VERSION = 2


def _parameters(n_subjects, shape, voxel_mm, n_visits, seed, interval_years,
                motion_mm=0.0) -> dict:
  """Validated generation parameters (what `dataset_description.json` records)."""
  def fail(field, value, why):
    raise ProgressionError(f'make_cohort: {field}={value!r}: {why}')
  if isinstance(n_subjects, bool) or not isinstance(n_subjects, (int, np.integer)) or (
      n_subjects < 1):
    fail('n_subjects', n_subjects, 'expected an integer >= 1')
  try:
    shape = tuple(int(n) for n in shape)
  except (TypeError, ValueError):
    fail('shape', shape, 'expected three integers (voxels)')
  if len(shape) != 3 or min(shape) < 16:
    fail('shape', shape, 'expected three integers >= 16 (voxels)')
  if not (isinstance(voxel_mm, (int, float)) and math.isfinite(voxel_mm) and voxel_mm > 0):
    fail('voxel_mm', voxel_mm, 'expected a positive number of mm')
  if not isinstance(n_visits, (int, np.integer)) or n_visits < 1:
    fail('n_visits', n_visits, 'expected an integer >= 1')
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    fail('seed', seed, 'expected an integer >= 0')
  if not (isinstance(interval_years, (int, float)) and math.isfinite(interval_years)
          and interval_years > 0):
    fail('visit_interval_years', interval_years, 'expected a positive number of years')
  if not (isinstance(motion_mm, (int, float)) and 0 <= motion_mm <= 10):
    fail('motion_mm', motion_mm, 'expected a number of mm (and degrees) in [0, 10]')
  months = visit_months(int(n_visits), float(interval_years))
  if len(set(months)) != len(months):
    fail('visit_interval_years', interval_years,
         f'visits fall in the same month {months}; sessions are named by months since baseline')
  return {'n_subjects': int(n_subjects), 'shape': list(shape), 'voxel_mm': float(voxel_mm),
          'n_visits': int(n_visits), 'seed': int(seed),
          'visit_interval_years': float(interval_years), 'motion_mm': float(motion_mm),
          'format_version': FORMAT_VERSION}


def _anat_path(root: Path, subject: str, session: str, suffix: str) -> Path:
  return root / subject / session / 'anat' / f'{subject}_{session}_{suffix}.nii.gz'


def _make_subject(job: tuple) -> tuple[int, list[dict]]:
  """Simulates and writes one subject (runs in a worker); returns its ground-truth rows."""
  plan, params, root = job
  shape, voxel_mm = tuple(params['shape']), params['voxel_mm']
  affine = phantom.grid_affine(shape, voxel_mm)
  voxel_ml = voxel_mm ** 3 / 1000.0
  rows = []
  for visit, result in zip(plan.visits, simulate_subject(plan, shape, voxel_mm, params['seed'],
                                                         params['motion_mm'])):
    io.save_image(_anat_path(root, plan.participant_id, visit.session, 'T1w'), result['image'],
                  affine, dtype=np.int16)
    io.save_labels(_anat_path(root, plan.participant_id, visit.session, 'dseg'),
                   result['labels'], affine)
    per_id = L.id_counts(result['labels'])
    row = {'subject': plan.participant_id, 'session': visit.session,
           'years_from_first': visit.years, 'stage': plan.baseline.stage}
    row.update({f'{name}_ml': float(per_id[list(ids)].sum()) * voxel_ml
                for name, ids in L.REGIONS.items()})
    row['intracranial_ml'] = float(per_id[1:].sum()) * voxel_ml
    row.update({f'{name}_annual_rate_pct': plan.rates[name] for name in RATE_REGIONS})
    row.update({f'{name}_expected_rate_pct': plan.expected_rates[name]
                for name in RATE_REGIONS})
    row.update(motion_columns(result['motion']))
    rows.append(row)
  return plan.index, rows


def motion_columns(transform: np.ndarray) -> dict[str, float]:
  """The 4x4 follow-up -> baseline world transform as 12 columns motion_r<i><j>, motion_t<i>."""
  columns = {f'motion_r{i}{j}': float(transform[i, j]) for i in range(3) for j in range(3)}
  columns.update({f'motion_t{i}_mm': float(transform[i, 3]) for i in range(3)})
  return columns


def motion_from_columns(row: Mapping[str, float]) -> np.ndarray:
  """The 4x4 transform of a ground-truth row's `motion_columns` (their inverse)."""
  transform = np.eye(4)
  transform[:3, :3] = [[row[f'motion_r{i}{j}'] for j in range(3)] for i in range(3)]
  transform[:3, 3] = [row[f'motion_t{i}_mm'] for i in range(3)]
  return transform


def _write_tables(root: Path, plans: list[SubjectPlan], rows: list[dict], params: dict) -> None:
  lines = ['participant_id\tsex\teducation_level\tapoe4']
  lines += [f'{p.participant_id}\t{p.sex}\t{p.baseline.education_years}\t{p.baseline.apoe4}'
            for p in plans]
  (root / 'participants.tsv').write_text('\n'.join(lines) + '\n')
  for p in plans:
    lines = ['session_id\tage\tdiagnosis\tMMSE\tcdr_sb']
    lines += [f'{v.session}\t{v.age_years:.2f}\t{v.diagnosis}\t{v.mmse}\t{v.cdrsb:.1f}'
              for v in p.visits]
    (root / p.participant_id / f'{p.participant_id}_sessions.tsv').write_text(
        '\n'.join(lines) + '\n')
  pd.DataFrame(rows).to_csv(root / 'ground_truth.tsv', sep='\t', index=False,
                            float_format='%.6f')
  description = {
      'Name': 'progression synthetic longitudinal cohort', 'BIDSVersion': '1.9.0',
      'DatasetType': 'raw',
      'GeneratedBy': [{'Name': 'progression.synthetic', 'Version': progression.__version__}],
      'ProgressionSynthetic': {
          'parameters': params,
          'disease_model': 'progression.disease_model (latent stage -> anatomy, scores, rates)',
          'notes': ('T1w: int16 scanner units (WM ~1000), bias field and Rician noise. dseg: '
                    'FreeSurfer ids. ground_truth.tsv: <region>_ml counted on the dseg maps; '
                    '<region>_annual_rate_pct: the subject\'s true compound annual change '
                    '(signed %, V(t) = V(0) (1 + rate/100)^t); <region>_expected_rate_pct: its '
                    'expectation given the baseline observables; stage: the latent disease '
                    'stage; motion_*: the visit-to-baseline rigid transform (mm). Anatomy is '
                    'at real size when the field of view holds it (progression.phantom).')}}
  (root / 'dataset_description.json').write_text(json.dumps(description, indent=2) + '\n')


def _is_complete(root: Path, params: dict) -> str | None:
  """None when `root` is a complete cohort made with `params`, else why not."""
  try:
    recorded = json.loads((root / 'dataset_description.json').read_text())
    recorded = recorded['ProgressionSynthetic']['parameters']
  except (OSError, ValueError, KeyError, TypeError):
    return 'it has no readable dataset_description.json from progression.synthetic'
  if recorded != params:
    diff = ', '.join(f'{k} {recorded.get(k)!r} there, {params[k]!r} requested'
                     for k in params if recorded.get(k) != params[k])
    return f'it was made with other parameters ({diff})'
  plans = plan_cohort(params['n_subjects'], params['n_visits'], params['seed'],
                      params['visit_interval_years'])
  expected = [root / 'participants.tsv', root / 'ground_truth.tsv']
  for p in plans:
    expected.append(root / p.participant_id / f'{p.participant_id}_sessions.tsv')
    for v in p.visits:
      expected += [_anat_path(root, p.participant_id, v.session, s) for s in ('T1w', 'dseg')]
  missing = [str(path) for path in expected if not path.is_file()]
  return f'{len(missing)} files are missing, e.g. {missing[0]}' if missing else None


def make_cohort(out_dir: str | os.PathLike, n_subjects: int,
                shape: tuple[int, int, int] = (64, 64, 64), voxel_mm: float = 2.0,
                n_visits: int = 3, seed: int = 0, visit_interval_years: float = 1.0,
                progress: Callable[[int, int], None] | None = None,
                workers: int | None = None, motion_mm: float = 0.0) -> Path:
  """Writes a simulated longitudinal cohort in Clinica's BIDS layout; returns its folder.

  Layout: participants.tsv (participant_id, sex, education_level, apoe4);
  sub-XXX/sub-XXX_sessions.tsv (session_id ses-M<months>, age, diagnosis, MMSE, cdr_sb);
  sub-XXX/ses-MXXX/anat/sub-XXX_ses-MXXX_{T1w,dseg}.nii.gz; ground_truth.tsv (subject,
  session, years_from_first, stage, <region>_ml for each `labels.REGIONS`,
  <region>_annual_rate_pct, <region>_expected_rate_pct, motion_* transform columns);
  dataset_description.json. Images are RAS+, `voxel_mm` isotropic voxels, centred at the
  origin. The same arguments give byte-identical files (any number of workers).

  Args:
    out_dir: target folder; must be absent, empty, or a complete cohort made with the same
      arguments (then it is returned untouched).
    n_subjects: number of subjects (diagnoses CN/MCI/AD ~ 40/35/25 %).
    shape: grid in voxels; voxel_mm: voxel edge (mm). Heads are at real size when the field
      of view holds them (96 x 112 x 96 at 2 mm), else shrunk to fit.
    n_visits: visits per subject, every `visit_interval_years` (years; sessions are named by
      round(12 * years) months, and that rounded time is the simulated time).
    seed: integer >= 0; subject i's data depend only on (seed, i, its diagnosis).
    progress: called as progress(subjects_done, n_subjects).
    workers: processes (default: the available CPUs, at most 8, for jobs of more than a few
      seconds; else in-process).
    motion_mm: rigid head motion between visits, up to this many mm and degrees (0: none).

  Raises:
    ProgressionError: for bad arguments or an `out_dir` holding something else.
  """
  params = _parameters(n_subjects, shape, voxel_mm, n_visits, seed, visit_interval_years,
                       motion_mm)
  out = Path(out_dir)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    why = _is_complete(out, params) if out.is_dir() else 'it is a file'
    if why is None:
      return out
    raise ProgressionError(f'{out}: refusing to write the cohort there: the folder is not empty '
                           f'and {why}; choose another folder or delete it')
  io.make_folder(out.parent, f'folder for the cohort {out}')
  tmp = Path(tempfile.mkdtemp(prefix=f'{out.name}.tmp-', dir=out.parent))
  try:
    plans = plan_cohort(params['n_subjects'], params['n_visits'], params['seed'],
                        params['visit_interval_years'])
    jobs = [(plan, params, tmp) for plan in plans]
    results = {}
    for index, rows in _map(jobs, params, workers):
      results[index] = rows
      if progress is not None:
        progress(len(results), len(plans))
    _write_tables(tmp, plans, [row for i in sorted(results) for row in results[i]], params)
    os.chmod(tmp, 0o777 & ~_umask())
    try:
      os.rename(tmp, out)
    except OSError:
      if out.is_dir() and _is_complete(out, params) is None:  # Made meanwhile by another run.
        shutil.rmtree(tmp, ignore_errors=True)
        return out
      raise ProgressionError(f'{out}: appeared while the cohort was written; it is left as is '
                             'and the new cohort was discarded') from None
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _map(jobs: list[tuple], params: dict, workers: int | None):
  """Yields `_make_subject(job)` results, in a process pool for big jobs."""
  if workers is None:  # Auto: a pool only when it pays for its ~1 s start.
    seconds = len(jobs) * params['n_visits'] * 0.15 * np.prod(params['shape']) / 64 ** 3
    workers = worker_pool.available_cpus() if seconds > 3.0 else 1
  yield from worker_pool.map_unordered(_make_subject, jobs, workers)
