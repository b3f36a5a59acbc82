"""`python -m experiments.evaluate` end to end on the trained_workdir fixture, and its errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from progression import cohort
from progression import labels as L
from progression.errors import ProgressionError
from progression.evaluation import report, visit_volumes
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
METHODS = {'model', 'regional_model', 'population_rate', 'no_change', 'oracle', 'expected'}


def _evaluate(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'experiments.evaluate', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600, env=dict(os.environ))


def _splits(cohort_root) -> dict[str, pd.DataFrame]:
  """The training run's split, recomputed here from the tiny config's fractions and seed."""
  config = tiny_config(cohort_root)
  _, pairs = cohort.load_cohort(config.cohort.spec, cohort_root)
  split = cohort.split_subjects(pairs.subject.unique(), tuple(config.cohort.split_fractions),
                                seed=config.cohort.split_seed)
  return {name: pairs[pairs.subject.map(split) == name] for name in cohort.SPLITS}


def _dseg_ml(path, region):
  image = nib.load(path)
  voxel_ml = float(np.prod(image.header.get_zooms()[:3])) / 1000.0
  return np.isin(np.asanyarray(image.dataobj), L.REGIONS[region]).sum() * voxel_ml


def _one_line_error(result: subprocess.CompletedProcess) -> str:
  assert result.returncode == 1, result.stderr[-3000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  return lines[0]


@pytest.fixture(scope='module')
def cli_report(trained_workdir, synthetic_cohort, tmp_path_factory):
  out = tmp_path_factory.mktemp('evaluation') / 'report'
  result = _evaluate(f'--workdir={trained_workdir}', '--cohort=synthetic',
                     f'--cohort_root={synthetic_cohort}', '--split=test', f'--out={out}')
  assert result.returncode == 0, result.stderr[-5000:]
  return out, result


def test_cli_writes_the_four_files_with_one_row_per_pair_region_method(cli_report,
                                                                       synthetic_cohort):
  out, result = cli_report
  test_pairs = _splits(synthetic_cohort)['test']
  assert {p.name for p in out.iterdir()} == {*report.REPORT_FILES, 'population_rates.json',
                                             'regional_model.json'}
  rows = pd.read_csv(out / 'pairs.csv')
  assert len(rows) == len(test_pairs) * len(L.REGIONS) * len(METHODS)
  assert set(rows.method) == METHODS and set(rows.region) == set(L.REGIONS)
  assert set(rows.subject) == set(test_pairs.subject)
  assert (rows.volume_method == 'labels').all()
  model = rows[rows.method == 'model']
  assert np.isfinite(model[['predicted_ml', 'ssim_brain', 'psnr_volume']]).all().all()
  assert (model[model.region == 'whole_brain'].predicted_ml > 0).all()
  n = len(test_pairs)
  assert f'{n}/{n} test pairs evaluated' in result.stderr  # The progress bar.
  assert f'report: {out / "report.html"}' in result.stdout
  for method in METHODS:  # The headline table; references marked as such.
    suffix = ' (reference)' if method in ('oracle', 'expected') else ''
    assert f'| {method}{suffix} |' in result.stdout
  html = (out / 'report.html').read_text()
  assert html.count('src="data:image/png;base64,') >= 3 and 'src="http' not in html
  summary = pd.read_csv(out / 'summary.csv')
  assert set(summary.grouping) == {'all', 'diagnosis', 'interval'}
  assert set(summary.method) == METHODS


def test_cli_no_change_errors_are_the_true_changes_in_the_dseg_files(cli_report,
                                                                      synthetic_cohort):
  out, _ = cli_report
  rows = pd.read_csv(out / 'pairs.csv').set_index(
      ['method', 'subject', 'baseline_session', 'followup_session', 'region'])
  for pair in _splits(synthetic_cohort)['test'].itertuples():
    for region in ('hippocampus', 'lateral_ventricles', 'whole_brain'):
      change = _dseg_ml(pair.followup_labels, region) - _dseg_ml(pair.baseline_labels, region)
      key = (pair.subject, pair.baseline_session, pair.followup_session, region)
      still = rows.loc[('no_change', *key)]
      assert still.predicted_change_ml == 0
      assert still.error_ml == pytest.approx(-change, abs=1e-5)
      # Every method starts from the same measured baseline volume.
      assert rows.loc[('model', *key)].baseline_ml == pytest.approx(still.baseline_ml)


def test_population_rates_are_fitted_on_the_training_split(cli_report, synthetic_cohort):
  out, _ = cli_report
  rates = json.loads((out / 'population_rates.json').read_text())
  train_pairs = _splits(synthetic_cohort)['train']
  assert rates['num_pairs']['whole_brain']['all'] == len(train_pairs)
  assert rates['volume_method'] == 'labels'


def test_cli_refuses_a_non_empty_out_without_overwrite(trained_workdir, tmp_path):
  (tmp_path / 'keep.txt').write_text('precious')
  error = _one_line_error(_evaluate(f'--workdir={trained_workdir}', f'--out={tmp_path}'))
  assert 'not empty' in error and '--overwrite' in error
  assert (tmp_path / 'keep.txt').read_text() == 'precious'


def test_cli_names_a_missing_followup_image(trained_workdir, synthetic_cohort, tmp_path):
  copy = tmp_path / 'cohort'
  shutil.copytree(synthetic_cohort, copy)
  missing = Path(_splits(copy)['test'].followup_image.iloc[-1])
  missing.unlink()
  error = _one_line_error(_evaluate(f'--workdir={trained_workdir}', f'--cohort_root={copy}',
                                    f'--out={tmp_path / "report"}'))
  assert str(missing) in error and 'not found' in error
  assert not (tmp_path / 'report').exists()


@pytest.fixture
def evaluate_module():
  from progression.evaluation import pipeline
  return pipeline


def test_empty_split_is_an_error(evaluate_module, trained_workdir, synthetic_cohort, tmp_path):
  copy = tmp_path / 'cohort'
  shutil.copytree(synthetic_cohort, copy)
  participants = (copy / 'participants.tsv').read_text().splitlines()
  (copy / 'participants.tsv').write_text('\n'.join(participants[:3]) + '\n')  # 2 subjects
  splits = _splits(copy)
  empty = next(name for name in ('test', 'val') if len(splits[name]) == 0)
  with pytest.raises(ProgressionError, match=f"split '{empty}'.*no pairs"):
    evaluate_module.evaluate_checkpoint(trained_workdir / 'checkpoints', tmp_path / 'out',
                                        split=empty, cohort_root=copy)


def test_followup_on_another_grid_is_an_error(evaluate_module, trained_workdir,
                                              synthetic_cohort, tmp_path):
  copy = tmp_path / 'cohort'
  shutil.copytree(synthetic_cohort, copy)
  moved = _splits(copy)['test'].followup_image.iloc[0]
  image = nib.load(moved)
  affine = image.affine.copy()
  affine[:3, 3] += 2.0
  nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), affine), moved)
  with pytest.raises(ProgressionError, match=f'{moved}.*another voxel grid'):
    evaluate_module.evaluate_checkpoint(trained_workdir, tmp_path / 'out', cohort_root=copy)
  assert not (tmp_path / 'out').exists()


def test_a_short_training_learns_the_direction_of_change(cli_report):
  """The honest learning test: a 6-step run on 12 subjects beats no change on the ventricles
  and forecasts the right sign of the mean change of the hippocampus, ventricles and whole
  brain (the anchored generator's prior comes from the regional model fitted on the training
  split)."""
  out, _ = cli_report
  rows = pd.read_csv(out / 'pairs.csv')
  mae = rows.groupby(['method', 'region']).abs_error_ml.mean()
  assert mae[('model', 'lateral_ventricles')] < mae[('no_change', 'lateral_ventricles')]
  model = rows[rows.method == 'model']
  for region in ('hippocampus', 'lateral_ventricles', 'whole_brain'):
    of_region = model[model.region == region]
    assert np.sign(of_region.predicted_change_ml.mean()) == np.sign(
        of_region.true_change_ml.mean()), region


def test_tissue_volumes_evaluate_t1w_only_forecasts_of_a_labelled_cohort(
    evaluate_module, trained_workdir, synthetic_cohort, tmp_path):
  """--volume_method=tissue: every method on the tissue model's regions, the model without
  label maps (its tissue-model fallback), the regional row the checkpoint's tissue model."""
  store = trained_workdir / visit_volumes.FILE_NAME  # Training's measurements, read here.
  measured = store.read_text()
  assert '"tissue:' in measured and '"labels:' in measured
  outputs = evaluate_module.evaluate_checkpoint(trained_workdir / 'checkpoints', tmp_path / 'out',
                                                cohort_root=synthetic_cohort,
                                                volume_method='tissue', num_examples=0)
  assert store.read_text() == measured  # Never written by an evaluation.
  rows = pd.read_csv(outputs.files['pairs.csv'])
  assert set(rows.region) == {'brain', 'csf', 'gray_matter', 'white_matter'}
  assert set(rows.volume_method) == {'tissue'}
  assert set(rows.method) == {'model', 'regional_model', 'population_rate', 'no_change'}
  saved = json.loads((tmp_path / 'out' / 'regional_model.json').read_text())
  assert saved['volume_method'] == 'tissue'
  # The model anchors on that regional model: brain changes in the same direction.
  brain = rows[rows.region == 'brain'].set_index(['subject', 'baseline_session',
                                                  'followup_session'])
  model = brain[brain.method == 'model'].predicted_change_ml
  regional = brain[brain.method == 'regional_model'].predicted_change_ml.loc[model.index]
  assert (np.sign(model.to_numpy()) == np.sign(regional.to_numpy())).all()
  assert (model.abs() > 0).all()
  with pytest.raises(ProgressionError, match="volume method 'atlas'"):
    evaluate_module.evaluate_checkpoint(trained_workdir, tmp_path / 'bad',
                                        cohort_root=synthetic_cohort, volume_method='atlas')
