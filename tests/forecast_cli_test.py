"""experiments.forecast: files on the input's grid, volumes.csv, atomic outputs, one-line errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from progression import cohort, forecast, forecast_io, labels
from progression.errors import ProgressionError
from tests.forecast_test import reoriented

REPO = Path(__file__).resolve().parents[1]
COVARIATE_ARGS = ['--age=73.2', '--sex=F', '--diagnosis=MCI', '--mmse=27', '--apoe4=1']


def _command(checkpoint, baseline, out, *extra):
  return [sys.executable, '-m', 'experiments.forecast', f'--checkpoint={checkpoint}',
          f'--baseline={baseline}', f'--out={out}', *COVARIATE_ARGS, *extra]


def _run(args, timeout=300):
  return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _snapshot(folder: Path) -> dict[str, bytes]:
  """Every file under `folder` (hidden ones too) -> its bytes."""
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*'))
          if p.is_file()}


@pytest.fixture(scope='module')
def non_ras_inputs(synthetic_cohort, tmp_path_factory):
  """First baseline of the cohort and its labels, stored in S-L-P voxel order."""
  visits = cohort.read_visits(cohort.load_spec('synthetic'), synthetic_cohort)
  folder = tmp_path_factory.mktemp('inputs')
  image = folder / 'sub-001_ses-M000_T1w.nii.gz'
  dseg = folder / 'sub-001_ses-M000_dseg.nii.gz'
  nib.save(reoriented(visits.iloc[0]['image_path']), image)
  nib.save(reoriented(visits.iloc[0]['labels_path']), dseg)
  return image, dseg


@pytest.fixture(scope='module')
def cli_outputs(trained_workdir, non_ras_inputs, tmp_path_factory):
  image, dseg = non_ras_inputs
  out = tmp_path_factory.mktemp('cli') / 'forecast'
  result = _run(_command(trained_workdir, image, out, f'--labels={dseg}', '--years=1,1.5,3'))
  assert result.returncode == 0, result.stderr[-3000:]
  return out


def test_cli_writes_named_files_on_the_input_grid(cli_outputs, non_ras_inputs):
  image, _ = non_ras_inputs
  names = sorted(p.name for p in cli_outputs.iterdir())
  expected = sorted([f'sub-001_ses-M000_forecast-{t}_{kind}.nii.gz' for t in ('1y', '1.5y', '3y')
                     for kind in ('T1w', 'jacobian', 'dseg')] + ['volumes.csv'])
  assert names == expected
  source = nib.load(image)
  for name in names[:-1]:
    written = nib.load(cli_outputs / name)
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-6)
    assert nib.aff2axcodes(written.affine) == ('S', 'L', 'P')
  assert not [p for p in cli_outputs.parent.iterdir() if p.name.startswith('.')]


def test_volumes_csv_matches_the_written_jacobians(cli_outputs, non_ras_inputs):
  _, dseg = non_ras_inputs
  table = pd.read_csv(cli_outputs / 'volumes.csv')
  assert list(table.columns) == ['years', 'region', 'volume_ml', 'lower_ml', 'upper_ml',
                                 'baseline_volume_ml', 'change_pct', 'method']
  assert (table.lower_ml < table.volume_ml).all() and (table.volume_ml < table.upper_ml).all()
  assert sorted(table.years.unique()) == [1.0, 1.5, 3.0]
  assert set(table.method) == {'labels'}
  label_image = nib.load(dseg)
  label_map = np.asarray(label_image.dataobj)
  voxel_ml = abs(np.linalg.det(label_image.affine[:3, :3])) / 1000.0
  for years, tag in ((1.0, '1y'), (1.5, '1.5y'), (3.0, '3y')):
    jacobian = nib.load(cli_outputs / f'sub-001_ses-M000_forecast-{tag}_jacobian.nii.gz')
    jacobian = np.asarray(jacobian.dataobj, dtype=np.float64)
    for region, ids in labels.REGIONS.items():
      row = table[(table.years == years) & (table.region == region)]
      inside = np.isin(label_map, ids)
      assert row.volume_ml.item() == pytest.approx(jacobian[inside].sum() * voxel_ml, rel=1e-5)
      assert row.baseline_volume_ml.item() == pytest.approx(inside.sum() * voxel_ml, rel=1e-6)


def test_cli_refuses_to_overwrite_and_leaves_outputs_untouched(trained_workdir, cli_outputs,
                                                               non_ras_inputs):
  image, dseg = non_ras_inputs
  before = _snapshot(cli_outputs.parent)
  result = _run(_command(trained_workdir, image, cli_outputs, f'--labels={dseg}',
                         '--years=1,1.5,3'))
  _assert_one_line_error(result, 'output exists')
  assert _snapshot(cli_outputs.parent) == before


def _assert_one_line_error(result, fragment):
  assert result.returncode == 1, (result.stdout, result.stderr)
  assert 'Traceback' not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and fragment in errors[0], result.stderr[-2000:]
  assert result.stderr.rstrip().splitlines()[-1] == errors[0]


@pytest.fixture(scope='module')
def broken_checkpoints(trained_workdir, tmp_path_factory):
  """Copies of the trained checkpoint with a changed grid or format version in its metadata."""
  made = {}
  for name, change in (('grid', {'grid': {'shape': [32, 32, 32], 'voxel_size_mm': [4, 4, 4]}}),
                       ('version', {'format_version': 999})):
    copy = tmp_path_factory.mktemp(name) / 'workdir'
    shutil.copytree(trained_workdir / 'checkpoints', copy / 'checkpoints')
    for metadata in (copy / 'checkpoints').glob('*/metadata/metadata'):
      metadata.write_text(json.dumps({**json.loads(metadata.read_text()), **change}))
    made[name] = copy
  return made


def test_cli_bad_inputs_fail_in_one_line_without_outputs(trained_workdir, non_ras_inputs,
                                                          broken_checkpoints, tmp_path):
  image, dseg = non_ras_inputs
  four_d = tmp_path / 'four_d.nii.gz'
  data = np.asarray(nib.load(image).dataobj)
  nib.save(nib.Nifti1Image(np.stack([data, data], -1), nib.load(image).affine), four_d)
  cases = {
      'age': (_command(trained_workdir, image, tmp_path / 'o1', '--age=old'), '--age=old'),
      'diagnosis': (_command(trained_workdir, image, tmp_path / 'o2', '--diagnosis=flu'),
                    'diagnosis'),
      'years': (_command(trained_workdir, image, tmp_path / 'o3', '--years=1,x'), '--years=1,x'),
      '4d': (_command(trained_workdir, four_d, tmp_path / 'o4'), 'expected a 3D image'),
      'checkpoint': (_command(tmp_path / 'absent', image, tmp_path / 'o5'), 'not found'),
      'grid': (_command(broken_checkpoints['grid'], image, tmp_path / 'o6'), 'grid'),
      'version': (_command(broken_checkpoints['version'], image, tmp_path / 'o7'),
                  'format version 999'),
  }
  procs = {name: subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for name, (args, _) in cases.items()}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    _assert_one_line_error(result, cases[name][1])
  assert sorted(p.name for p in tmp_path.iterdir()) == ['four_d.nii.gz']


def _trajectory(forecaster_path, image, dseg, years=(1.0, 2.0)):
  forecaster = forecast.Forecaster.from_checkpoint(forecaster_path)
  return forecaster.forecast(image, {'age_years': 70, 'sex': 'M', 'diagnosis': 'AD'}, years,
                             labels=dseg)


def test_save_is_all_or_nothing(trained_workdir, non_ras_inputs, tmp_path, monkeypatch):
  image, dseg = non_ras_inputs
  trajectory = _trajectory(trained_workdir, image, dseg)
  out = tmp_path / 'out'
  calls = []

  def failing_save(img, path):
    calls.append(path)
    if len(calls) == 3:
      raise OSError('disk full')
    img.to_filename(path)

  monkeypatch.setattr(forecast_io.nib, 'save', failing_save)
  with pytest.raises(ProgressionError, match='disk full'):
    forecast_io.save_forecasts(trajectory, out, 'sub')
  assert list(tmp_path.iterdir()) == []  # No out folder, no staging folder left behind.
  monkeypatch.undo()

  written = forecast_io.save_forecasts(trajectory, out, 'sub')
  assert [p.name for p in written][-1] == 'volumes.csv' and all(p.is_file() for p in written)
  with pytest.raises(ProgressionError, match='output exists'):
    forecast_io.save_forecasts(trajectory, out, 'sub')
  (out / 'notes.txt').write_text('kept')
  rewritten = forecast_io.save_forecasts(trajectory[:1], out, 'sub', overwrite=True)
  assert (out / 'notes.txt').read_text() == 'kept'
  assert len(pd.read_csv(rewritten[-1]).years.unique()) == 1
  assert sorted(p.name for p in tmp_path.iterdir()) == ['out']


def test_output_names():
  assert [forecast_io.horizon_name(t) for t in (0, 1, 1.5, 0.25, 10)] == [
      '0y', '1y', '1.5y', '0.25y', '10y']
  assert forecast_io.output_stem('/a/sub-01_ses-M000_T1w.nii.gz') == 'sub-01_ses-M000'
  assert forecast_io.output_stem('scan.nii') == 'scan'
  with pytest.raises(ProgressionError, match='duplicate'):
    forecast_io.output_paths('out', 's', [1, 1.0], with_labels=False)


_KILL_SCRIPT = '''
import os, signal, sys
import nibabel as nib, numpy as np
from progression import forecast
from progression import forecast_io as cli
out, where, count, overwrite = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == '1'
image = nib.Nifti1Image(np.arange(64, dtype=np.float32).reshape(4, 4, 4), np.eye(4))
trajectory = [forecast.Forecast(t, image, image, image, image, {'hippocampus': 1.0},
                                {'hippocampus': 1.1}, 'labels') for t in (1.0, 2.0)]
module = cli.nib if where == 'save' else cli.io.os
real, calls = getattr(module, where), []
def killing(*args):
  calls.append(args)
  if len(calls) == count:
    os.kill(os.getpid(), signal.SIGKILL)
  return real(*args)
setattr(module, where, killing)
cli.save_forecasts(trajectory, out, 'sub', overwrite=overwrite)
'''


def _killed_save(out: Path, where: str, count: int, overwrite: bool):
  result = _run([sys.executable, '-c', _KILL_SCRIPT, str(out), where, str(count),
                 '1' if overwrite else '0'])
  assert result.returncode == -9, result.stderr[-2000:]


def test_kill_9_never_leaves_partial_outputs(tmp_path):
  out = tmp_path / 'out'
  _killed_save(out, 'save', 4, overwrite=False)  # Killed while writing the 4th of 7 files.
  assert not out.exists()  # Only a hidden staging folder, never a half-written output.
  assert all(p.name.startswith('.out.tmp-') for p in tmp_path.iterdir())

  image = nib.Nifti1Image(np.arange(64, dtype=np.float32).reshape(4, 4, 4), np.eye(4))
  forecast_io.save_forecasts(  # The same outputs as the script's, complete this time.
      [forecast.Forecast(t, image, image, image, image, {'hippocampus': 1.0},
                         {'hippocampus': 1.1}, 'labels') for t in (1.0, 2.0)], out, 'sub')
  _killed_save(out, 'replace', 3, overwrite=True)  # Killed while moving files in.
  assert not (out / 'volumes.csv').exists()  # The marker of a complete set is gone ...
  for path in out.iterdir():  # ... and every file there is whole (old or new).
    assert nib.load(path).get_fdata().sum() == np.arange(64).sum()
