"""A bad-input corpus (made here, nothing committed) run through the public CLIs.

Every case runs one `python -m experiments.{forecast,evaluate,train,make_cohort}` process on
a corrupted input (a file, a cohort copy, a checkpoint copy, or an unusable output path) and
requires what a user error must give: exit status 1; the last line of stderr is the only
'error: ...' line and names the file/row/field; no Python traceback; no output file left
(absent, or folders without files); every input file's sha256 unchanged.

The processes of all cases run concurrently in one module fixture (each pays ~5 s of JAX
import); the parametrized test then checks one case.
"""

import concurrent.futures
import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import jax
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from progression import checkpoints, train
from tests.conftest import restore_train_state, tiny_config

REPO = Path(__file__).resolve().parents[1]
COVARIATES = ['--age=73.2', '--sex=F', '--diagnosis=MCI']
_WORKERS = 3  # Concurrent CLI processes (2 cores; JAX import is partly I/O).


@dataclasses.dataclass
class Case:
  args: list[str]  # After `python -m`.
  fragments: list[str]  # Must all appear in the error line.
  inputs: list[Path]  # Files or folders whose every file must keep its bytes.
  outputs: list[Path]  # Must hold no file afterwards.
  check: Callable[['Case'], None] | None = None  # More checks after the run.
  # Filled by the fixture.
  before: dict[str, str] = dataclasses.field(default_factory=dict)
  result: subprocess.CompletedProcess | None = None
  after: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Context:
  root: Path  # Where this module makes its corpus.
  cohort: Path  # The session's synthetic cohort (read-only).
  workdir: Path  # The session's trained workdir (read-only).
  baseline: Path  # A copy of one 32^3 baseline T1w of the cohort.
  labels: Path  # ... and its label map.


# ----------------------------------------------------------------------------- helpers

def sha256_tree(paths) -> dict[str, str]:
  """Every file under `paths` (files or folders, hidden files too) -> sha256 hex."""
  digests = {}
  for path in paths:
    files = [path] if path.is_file() else sorted(p for p in path.rglob('*') if p.is_file())
    for f in files:
      digests[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
  return digests


def files_under(path: Path) -> list[str]:
  if path.is_file() or path.is_symlink():
    return [str(path)]
  return sorted(str(p) for p in path.rglob('*') if not p.is_dir()) if path.is_dir() else []


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
  nib.save(nib.Nifti1Image(data, affine), path)
  return path


def _forecast(ctx: Context, name: str, baseline: Path, *extra: str,
              checkpoint: Path | None = None) -> Case:
  out = ctx.root / name / 'out'
  out.parent.mkdir(parents=True, exist_ok=True)
  checkpoint = checkpoint or ctx.workdir
  return Case(['experiments.forecast', f'--checkpoint={checkpoint}', f'--baseline={baseline}',
               f'--out={out}', *COVARIATES, *extra],
              fragments=[], inputs=[baseline, checkpoint], outputs=[out],
              check=_no_staging_beside(out))


def _no_staging_beside(out: Path):
  def check(case: Case) -> None:
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f'.{out.name}.tmp')]
    assert not leftovers, leftovers
  return check


def _case_dir(ctx: Context, name: str) -> Path:
  folder = ctx.root / name
  folder.mkdir(parents=True, exist_ok=True)
  return folder


def _cohort_copy(ctx: Context, name: str) -> Path:
  return Path(shutil.copytree(ctx.cohort, _case_dir(ctx, name) / 'cohort')).resolve()


def _checkpoint_copy(ctx: Context, name: str) -> Path:
  workdir = _case_dir(ctx, name) / 'workdir'
  shutil.copytree(ctx.workdir / checkpoints.CHECKPOINT_SUBDIR,
                  workdir / checkpoints.CHECKPOINT_SUBDIR)
  return workdir.resolve()


def _latest(workdir: Path) -> Path:
  folder = workdir / checkpoints.CHECKPOINT_SUBDIR
  return folder / str(max(int(p.name) for p in folder.iterdir() if p.name.isdigit()))


def _edit_tsv(path: Path, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> Path:
  table = pd.read_csv(path, sep='\t', dtype=str, keep_default_na=False)
  edit(table).to_csv(path, sep='\t', index=False)
  return path


def _sessions(cohort_root: Path, subject: str) -> Path:
  return cohort_root / subject / f'{subject}_sessions.tsv'


def _rename_session(cohort_root: Path, subject: str, old: str, new: str) -> None:
  """Renames a session in the sessions table, its folder and its files."""
  def edit(table):
    table.loc[table.session_id == old, 'session_id'] = new
    return table
  _edit_tsv(_sessions(cohort_root, subject), edit)
  folder = (cohort_root / subject / old).rename(cohort_root / subject / new)
  for f in (folder / 'anat').iterdir():
    f.rename(f.with_name(f.name.replace(old, new)))


def _train(ctx: Context, name: str, cohort_root: Path, *extra: str) -> Case:
  workdir = _case_dir(ctx, name) / 'workdir'
  return Case(['experiments.train', '--config=experiments/configs/tiny.py',
               f'--config.cohort.root={cohort_root}', f'--workdir={workdir}',
               '--config.num_steps=1', *extra],
              fragments=[], inputs=[cohort_root], outputs=[workdir])


def _test_split_followup(cohort_root: Path) -> Path:
  """The follow-up image of the first pair of the tiny config's test split."""
  data = train.load_experiment_data(tiny_config(cohort_root))
  return Path(data.test.followup_image.iloc[0])


def _evaluate(ctx: Context, name: str, cohort_root: Path | None = None,
              workdir: Path | None = None) -> Case:
  out = _case_dir(ctx, name) / 'report'
  workdir = workdir or ctx.workdir
  args = ['experiments.evaluate', f'--workdir={workdir}', f'--out={out}']
  if cohort_root is not None:
    args.append(f'--cohort_root={cohort_root}')
  return Case(args, fragments=[], inputs=[workdir] + ([cohort_root] if cohort_root else []),
              outputs=[out])


def _a_file(ctx: Context, name: str) -> Path:
  """A regular file where a folder's parent should be (unusable as an output parent)."""
  blocker = _case_dir(ctx, name) / 'not_a_folder'
  blocker.write_text('a regular file\n')
  return blocker


# ----------------------------------------------------------------------------- the corpus
# Each builder makes its inputs under ctx.root/<name> and returns the Case.

def corrupt_gzip(ctx):
  raw = ctx.baseline.read_bytes()
  path = _case_dir(ctx, 'corrupt_gzip') / 'corrupt_T1w.nii.gz'
  path.write_bytes(raw[:10] + bytes(b ^ 0xFF for b in raw[10:400]) + raw[400:])
  case = _forecast(ctx, 'corrupt_gzip', path)
  case.fragments = [str(path)]
  return case


def truncated_nii_gz(ctx):
  raw = ctx.baseline.read_bytes()
  path = _case_dir(ctx, 'truncated_nii_gz') / 'truncated_T1w.nii.gz'
  path.write_bytes(raw[:len(raw) // 2])
  case = _forecast(ctx, 'truncated_nii_gz', path)
  case.fragments = [str(path)]
  return case


def truncated_nii(ctx):
  image = nib.load(ctx.baseline)
  folder = _case_dir(ctx, 'truncated_nii')
  whole = _save(folder / 'whole.nii', np.asarray(image.dataobj), image.affine)
  path = folder / 'truncated_T1w.nii'
  path.write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
  whole.unlink()
  case = _forecast(ctx, 'truncated_nii', path)
  case.fragments = [str(path)]
  return case


def _edited_baseline(ctx, name: str, filename: str, edit, *fragments: str) -> Case:
  """A forecast case on a copy of the baseline whose voxel array went through `edit`."""
  image = nib.load(ctx.baseline)
  data = edit(np.asarray(image.dataobj, dtype=np.float32).copy())
  path = _save(_case_dir(ctx, name) / filename, data, image.affine)
  case = _forecast(ctx, name, path)
  case.fragments = [str(path), *fragments]
  return case


def image_2d(ctx):
  return _edited_baseline(ctx, 'image_2d', 'slice_T1w.nii.gz', lambda d: d[:, :, 16], '3D')


def image_4d(ctx):
  return _edited_baseline(ctx, 'image_4d', 'series_T1w.nii.gz',
                          lambda d: np.stack([d, d], -1), '3D')


def nan_voxels(ctx):
  def with_nan(data):
    data[10, 11, 12] = np.nan
    return data
  return _edited_baseline(ctx, 'nan_voxels', 'nan_T1w.nii.gz', with_nan, 'NaN')


def singular_affine(ctx):
  image = nib.load(ctx.baseline)
  data = np.asarray(image.dataobj)
  affine = image.affine.copy()
  affine[:3, 2] = 0.0  # The z axis maps to no direction: zero voxel volume.
  header = nib.Nifti1Header()
  header.set_data_shape(data.shape)
  header.set_data_dtype(data.dtype)
  header.set_sform(affine, code=1)  # Written raw: nibabel cannot make a qform of it.
  header['qform_code'] = 0
  path = _case_dir(ctx, 'singular_affine') / 'flat_T1w.nii.gz'
  nib.save(nib.Nifti1Image(data, None, header=header), path)
  assert abs(np.linalg.det(nib.load(path).affine[:3, :3])) == 0
  case = _forecast(ctx, 'singular_affine', path)
  case.fragments = [str(path), 'singular']
  return case


def missing_image(ctx):
  path = _case_dir(ctx, 'missing_image') / 'absent_T1w.nii.gz'
  case = _forecast(ctx, 'missing_image', path)
  case.inputs = case.inputs[1:]
  case.fragments = [str(path), 'not found']
  return case


def labels_on_another_grid(ctx):
  image = nib.load(ctx.labels)
  path = _save(_case_dir(ctx, 'labels_on_another_grid') / 'cropped_dseg.nii.gz',
               np.asarray(image.dataobj)[1:-1, 1:-1, 1:-1], image.affine)
  case = _forecast(ctx, 'labels_on_another_grid', ctx.baseline, f'--labels={path}')
  case.inputs.append(path)
  case.fragments = [str(path), 'grid']
  return case


def negative_interval(ctx):
  case = _forecast(ctx, 'negative_interval', ctx.baseline, '--years=1,-1')
  case.fragments = ['years', '-1']
  return case


def checkpoint_without_state(ctx):
  """A partial checkpoint: the latest step folder lost its `state` item."""
  workdir = _checkpoint_copy(ctx, 'checkpoint_without_state')
  step = _latest(workdir)
  shutil.rmtree(step / 'state')
  case = _forecast(ctx, 'checkpoint_without_state', ctx.baseline, checkpoint=workdir)
  case.fragments = [str(step)]
  return case


def checkpoint_garbled_arrays(ctx):
  """A corrupt checkpoint: the latest step's array chunks overwritten with zeros."""
  workdir = _checkpoint_copy(ctx, 'checkpoint_garbled_arrays')
  step = _latest(workdir)
  chunks = [p for p in (step / 'state').rglob('*') if p.is_file() and p.parent.name == 'd']
  assert chunks
  for p in chunks:
    p.write_bytes(bytes(p.stat().st_size))
  case = _forecast(ctx, 'checkpoint_garbled_arrays', ctx.baseline, checkpoint=workdir)
  case.fragments = [str(step)]
  return case


def checkpoint_truncated_metadata(ctx):
  workdir = _checkpoint_copy(ctx, 'checkpoint_truncated_metadata')
  metadata = _latest(workdir) / 'metadata' / 'metadata'
  metadata.write_text(metadata.read_text()[:200])
  case = _forecast(ctx, 'checkpoint_truncated_metadata', ctx.baseline, checkpoint=workdir)
  case.fragments = [str(metadata), 'JSON']
  return case


def checkpoint_unfinished_step(ctx):
  """A step folder holding only a copy of the metadata (e.g. an interrupted copy)."""
  workdir = _checkpoint_copy(ctx, 'checkpoint_unfinished_step')
  latest = _latest(workdir)
  partial = latest.parent / str(int(latest.name) + 2)
  shutil.copytree(latest / 'metadata', partial / 'metadata')
  case = _forecast(ctx, 'checkpoint_unfinished_step', ctx.baseline, checkpoint=workdir)
  case.fragments = [str(partial)]
  return case


def forecast_out_unwritable(ctx):
  case = _forecast(ctx, 'forecast_out_unwritable', ctx.baseline)
  out = _a_file(ctx, 'forecast_out_unwritable') / 'forecast'
  case.args = [a if not a.startswith('--out=') else f'--out={out}' for a in case.args]
  case.inputs.append(out.parent)
  case.outputs, case.check = [], None
  case.fragments = [str(out)]
  return case


def followup_on_another_grid(ctx):
  root = _cohort_copy(ctx, 'followup_on_another_grid')
  followup = _test_split_followup(root)
  image = nib.load(followup)
  _save(followup, np.asarray(image.dataobj)[1:-1, 1:-1, 1:-1], image.affine)
  case = _evaluate(ctx, 'followup_on_another_grid', root)
  case.fragments = [str(followup), 'grid']
  return case


def cohort_image_corrupt_gzip(ctx):
  root = _cohort_copy(ctx, 'cohort_image_corrupt_gzip')
  followup = _test_split_followup(root)
  raw = followup.read_bytes()
  followup.write_bytes(raw[:10] + bytes(b ^ 0xFF for b in raw[10:400]) + raw[400:])
  case = _evaluate(ctx, 'cohort_image_corrupt_gzip', root)
  case.fragments = [str(followup)]
  return case


def evaluate_checkpoint_without_metadata(ctx):
  workdir = _checkpoint_copy(ctx, 'evaluate_checkpoint_without_metadata')
  step = _latest(workdir)
  shutil.rmtree(step / 'metadata')
  case = _evaluate(ctx, 'evaluate_checkpoint_without_metadata', workdir=workdir)
  case.fragments = [str(step / 'metadata')]
  return case


def evaluate_out_unwritable(ctx):
  case = _evaluate(ctx, 'evaluate_out_unwritable')
  out = _a_file(ctx, 'evaluate_out_unwritable') / 'report'
  case.args = [a if not a.startswith('--out=') else f'--out={out}' for a in case.args]
  case.inputs += [out.parent, ctx.cohort]
  case.outputs = []
  case.fragments = [str(out)]
  return case


def missing_covariate_column(ctx):
  root = _cohort_copy(ctx, 'missing_covariate_column')
  path = _edit_tsv(_sessions(root, 'sub-003'), lambda t: t.drop(columns=['MMSE']))
  case = _train(ctx, 'missing_covariate_column', root)
  case.fragments = [str(path), 'MMSE']
  return case


def unknown_diagnosis(ctx):
  root = _cohort_copy(ctx, 'unknown_diagnosis')

  def edit(table):
    table.loc[1, 'diagnosis'] = 'FTD'
    return table
  path = _edit_tsv(_sessions(root, 'sub-004'), edit)
  case = _train(ctx, 'unknown_diagnosis', root)
  case.fragments = [str(path), 'row 2', 'diagnosis', 'FTD']
  return case


def duplicate_visit(ctx):
  root = _cohort_copy(ctx, 'duplicate_visit')
  path = _edit_tsv(_sessions(root, 'sub-005'), lambda t: pd.concat([t, t.iloc[[1]]]))
  case = _train(ctx, 'duplicate_visit', root)
  case.fragments = [str(path), 'row 4', 'ses-M012', 'duplicate']
  return case


def _renamed_session(name: str, new_session: str):
  """A case whose sub-006 ses-M024 is renamed `new_session` (a visit time that is wrong)."""
  def build(ctx):
    root = _cohort_copy(ctx, name)
    _rename_session(root, 'sub-006', 'ses-M024', new_session)
    case = _train(ctx, name, root)
    case.fragments = [str(_sessions(root, 'sub-006')), 'row 3', new_session]
    return case
  build.__name__ = name
  return build


# 12 months: the time of ses-M012 (interval 0); -12 months: a visit before the baseline.
zero_interval = _renamed_session('zero_interval', 'ses-M12')
negative_session_time = _renamed_session('negative_session_time', 'ses-M-12')


def followup_before_baseline(ctx):
  """The 24-month follow-up's age (age at the visit) is 2 years below the baseline's."""
  root = _cohort_copy(ctx, 'followup_before_baseline')

  def edit(table):
    table.loc[2, 'age'] = f'{float(table.loc[0, "age"]) - 2.0:.2f}'
    return table
  path = _edit_tsv(_sessions(root, 'sub-007'), edit)
  case = _train(ctx, 'followup_before_baseline', root)
  case.fragments = [str(path), 'row 3', 'age']
  return case


def cohort_missing_image(ctx):
  root = _cohort_copy(ctx, 'cohort_missing_image')
  image = root / 'sub-008/ses-M012/anat/sub-008_ses-M012_T1w.nii.gz'
  image.unlink()
  case = _train(ctx, 'cohort_missing_image', root)
  case.fragments = [str(_sessions(root, 'sub-008')), 'row 2', str(image), 'not found']
  return case


def non_finite_loss(ctx):
  """A learning rate of 1e30 makes the second step's loss NaN; step 1's checkpoint stays."""
  case = _train(ctx, 'non_finite_loss', ctx.cohort, '--config.num_steps=4',
                '--config.optim.learning_rate=1e30', '--config.checkpoint_every_steps=1')
  workdir = case.outputs[0]
  case.outputs = []
  case.fragments = ['non-finite loss', 'step', str(workdir / checkpoints.CHECKPOINT_SUBDIR)]

  def check(case: Case) -> None:
    error = case.result.stderr.strip().splitlines()[-1]
    step = int(re.search(r'non-finite loss \(\S+\) at step (\d+)', error).group(1))
    folder = workdir / checkpoints.CHECKPOINT_SUBDIR
    names = sorted(p.name for p in folder.iterdir())
    assert names == [str(s) for s in range(1, step)], names  # Finished steps only.
    assert f'last good checkpoint: step {step - 1}' in error
    state = restore_train_state(folder)
    assert int(state.step) == step - 1
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state.params))
  case.check = check
  return case


def train_resume_from_partial_checkpoint(ctx):
  workdir = _checkpoint_copy(ctx, 'train_resume_from_partial_checkpoint')
  step = _latest(workdir)
  shutil.rmtree(step / 'state')
  case = _train(ctx, 'train_resume_from_partial_checkpoint', ctx.cohort, '--config.num_steps=8')
  case.args = [a if not a.startswith('--workdir=') else f'--workdir={workdir}' for a in case.args]
  case.inputs, case.outputs = [workdir / checkpoints.CHECKPOINT_SUBDIR], []
  case.fragments = [str(step)]
  return case


def train_workdir_unwritable(ctx):
  workdir = _a_file(ctx, 'train_workdir_unwritable') / 'workdir'
  case = _train(ctx, 'train_workdir_unwritable', ctx.cohort)
  case.args = [a if not a.startswith('--workdir=') else f'--workdir={workdir}' for a in case.args]
  case.inputs, case.outputs = [workdir.parent], []
  case.fragments = [str(workdir)]
  return case


def make_cohort_out_unwritable(ctx):
  out = _a_file(ctx, 'make_cohort_out_unwritable') / 'cohort'
  return Case(['experiments.make_cohort', f'--out={out}', '--subjects=1', '--shape=16,16,16',
               '--visits=2'], fragments=[str(out)], inputs=[out.parent], outputs=[])


CASES = [non_finite_loss, followup_before_baseline, followup_on_another_grid,
         cohort_image_corrupt_gzip, evaluate_out_unwritable, evaluate_checkpoint_without_metadata,
         train_resume_from_partial_checkpoint, missing_covariate_column, unknown_diagnosis,
         duplicate_visit, zero_interval, negative_session_time, cohort_missing_image,
         train_workdir_unwritable, make_cohort_out_unwritable, corrupt_gzip, truncated_nii_gz,
         truncated_nii, image_2d, image_4d, nan_voxels, singular_affine, missing_image,
         labels_on_another_grid, negative_interval, checkpoint_without_state,
         checkpoint_garbled_arrays, checkpoint_truncated_metadata, checkpoint_unfinished_step,
         forecast_out_unwritable]


def _run(case: Case) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', *case.args], cwd=REPO, capture_output=True,
                        text=True, timeout=600, env=dict(os.environ))


def _selected_cases(request) -> set[str]:
  """Names of the cases whose tests this session runs (all of them without -k)."""
  return {item.callspec.params['name'] for item in request.session.items
          if item.module is request.module and hasattr(item, 'callspec')
          and 'name' in item.callspec.params}


@pytest.fixture(scope='module')
def corpus(request, synthetic_cohort, trained_workdir, tmp_path_factory) -> dict[str, Case]:
  """Builds the selected cases, runs their CLI processes concurrently; name -> Case."""
  root = tmp_path_factory.mktemp('bad_input').resolve()
  anat = Path(synthetic_cohort) / 'sub-001' / 'ses-M000' / 'anat'
  inputs = root / 'inputs'
  inputs.mkdir()
  ctx = Context(root=root, cohort=Path(synthetic_cohort).resolve(),
                workdir=Path(trained_workdir).resolve(),
                baseline=Path(shutil.copy(anat / 'sub-001_ses-M000_T1w.nii.gz', inputs)),
                labels=Path(shutil.copy(anat / 'sub-001_ses-M000_dseg.nii.gz', inputs)))
  selected = _selected_cases(request)
  cases = {build.__name__: build(ctx) for build in CASES if build.__name__ in selected}
  for case in cases.values():
    case.before = sha256_tree(case.inputs)
  with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
    results = dict(zip(cases, pool.map(_run, cases.values())))
  for name, case in cases.items():
    case.result = results[name]
    case.after = sha256_tree(case.inputs)
  return cases


@pytest.mark.parametrize('name', [build.__name__ for build in CASES])
def test_bad_input_fails_in_one_line_leaving_no_output(corpus, name):
  case = corpus[name]
  result = case.result
  detail = f'{case.args}\nexit {result.returncode}\nstderr tail:\n{result.stderr[-3000:]}'
  assert result.returncode == 1, detail
  assert 'Traceback' not in result.stderr, detail
  lines = result.stderr.rstrip().splitlines()
  errors = [line for line in lines if line.startswith('error:')]
  assert len(errors) == 1 and lines[-1] == errors[0], detail
  for fragment in case.fragments:
    assert fragment in errors[0], (fragment, errors[0])
  assert case.before and case.after == case.before, 'inputs changed'
  for output in case.outputs:
    assert not files_under(output), files_under(output)
  if case.check is not None:
    case.check(case)


def test_the_corpus_has_every_kind_of_bad_input():
  """The issue's list, each with at least one case above."""
  names = {build.__name__ for build in CASES}
  assert {'corrupt_gzip', 'truncated_nii_gz', 'truncated_nii', 'image_2d', 'image_4d',
          'nan_voxels', 'singular_affine', 'followup_on_another_grid', 'labels_on_another_grid',
          'missing_image', 'cohort_missing_image', 'missing_covariate_column',
          'unknown_diagnosis', 'negative_interval', 'negative_session_time', 'zero_interval',
          'duplicate_visit', 'followup_before_baseline', 'non_finite_loss',
          'checkpoint_without_state', 'checkpoint_garbled_arrays',
          'checkpoint_unfinished_step', 'forecast_out_unwritable', 'evaluate_out_unwritable',
          'train_workdir_unwritable', 'make_cohort_out_unwritable'} <= names
