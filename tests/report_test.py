"""progression.evaluation.report and figures with fake methods (no trained model needed)."""

import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from progression import cohort, io
from progression import labels as L
from progression.errors import ProgressionError
from progression.evaluation import baselines, report


@pytest.fixture(scope='module')
def pairs(synthetic_cohort):
  """The 6 pairs of the cohort's first two subjects."""
  _, all_pairs = cohort.load_cohort('synthetic', synthetic_cohort)
  first = sorted(all_pairs.subject.unique())[:2]
  return all_pairs[all_pairs.subject.isin(first)].reset_index(drop=True)


class Oracle:
  """Predicts the real follow-up (image and label-map volumes): every error is 0."""
  name = 'oracle'

  def predict(self, pair_row, baseline, baseline_labels):
    labels = io.load_labels(pair_row['followup_labels'])
    return baselines.Prediction(image=io.load_image(pair_row['followup_image']).data,
                                volumes_ml=baselines.measure_volumes_ml(None, labels, 'labels'),
                                volume_method='labels')


class WrongGrid:
  name = 'wrong_grid'

  def predict(self, pair_row, baseline, baseline_labels):
    return baselines.Prediction(image=baseline.data[1:], volumes_ml={}, volume_method='labels')


def _dseg_ml(path, region):
  """Region volume (mL) straight from a dseg file: voxel count x voxel volume from the header."""
  image = nib.load(path)
  data = np.asanyarray(image.dataobj)
  return np.isin(data, L.REGIONS[region]).sum() * float(np.prod(image.header.get_zooms()[:3])
                                                        ) / 1000.0


@pytest.fixture(scope='module')
def evaluation(pairs):
  return report.evaluate_pairs(pairs, [Oracle(), baselines.NoChangeBaseline('labels')])


def test_one_row_per_pair_region_method(pairs, evaluation):
  rows = evaluation.rows
  assert len(rows) == len(pairs) * len(L.REGIONS) * 2
  assert list(rows.columns) == list(report.ROW_COLUMNS)
  assert rows.groupby(['method', 'region']).size().eq(len(pairs)).all()
  assert evaluation.volume_method == 'labels'
  assert len(evaluation.examples) == 2 and set(evaluation.examples[0].predicted) == {
      'oracle', 'no_change'}


def test_no_change_error_in_volume_change_is_the_true_change_from_dseg_files(pairs, evaluation):
  rows = evaluation.rows[evaluation.rows.method == 'no_change']
  checked = 0
  for pair in pairs.itertuples():
    for region in ('hippocampus', 'lateral_ventricles', 'whole_brain', 'csf'):
      v0 = _dseg_ml(pair.baseline_labels, region)
      v1 = _dseg_ml(pair.followup_labels, region)
      row = rows[(rows.subject == pair.subject) & (rows.baseline_session == pair.baseline_session)
                 & (rows.followup_session == pair.followup_session) & (rows.region == region)]
      row = row.iloc[0]
      assert row.predicted_change_ml == 0.0
      assert row.true_change_ml == pytest.approx(v1 - v0, abs=1e-9)
      assert row.error_ml == pytest.approx(-(v1 - v0), abs=1e-9)  # predicted - true
      assert row.abs_error_ml == pytest.approx(abs(v1 - v0), abs=1e-9)
      assert row.abs_percent_error == pytest.approx(100 * abs(v1 - v0) / v1, rel=1e-9)
      true_rate = 100 * ((v1 / v0) ** (1 / pair.interval_years) - 1)
      assert row.true_rate_pct_per_year == pytest.approx(true_rate, rel=1e-9)
      assert row.predicted_rate_pct_per_year == 0.0
      assert row.rate_error_pct_per_year == pytest.approx(-true_rate, rel=1e-9)
      checked += 1
  # The cohort shrinks the brain and grows the ventricles: the signs are checked above.
  brain = rows[rows.region == 'whole_brain']
  assert (brain.true_change_ml < 0).all() and (brain.error_ml > 0).all()
  assert checked == 4 * len(pairs)


def test_oracle_scores_perfectly_and_baseline_image_does_not(evaluation):
  rows = evaluation.rows
  oracle, still = rows[rows.method == 'oracle'], rows[rows.method == 'no_change']
  assert (oracle.abs_error_ml == 0).all() and (oracle.abs_rate_error_pct_per_year == 0).all()
  assert (oracle.mse_brain == 0).all() and np.isinf(oracle.psnr_brain).all()
  np.testing.assert_allclose(oracle[['ssim_brain', 'ssim_volume']], 1.0)
  assert (still.mse_brain > 0).all() and (still.ssim_brain < 1).all()
  assert (still.psnr_volume > 10).all() and (still.ssim_volume > 0.5).all()


def test_summary_ci_contains_the_mean_and_groups_are_complete(pairs, evaluation):
  summary = report.summarize(evaluation.rows)
  assert list(summary.columns) == list(report.SUMMARY_COLUMNS)
  assert (summary.ci95_low <= summary['mean'] + 1e-12).all()
  assert (summary['mean'] <= summary.ci95_high + 1e-12).all()
  assert set(summary.grouping) == {'all', 'diagnosis', 'interval'}
  overall = summary[(summary.grouping == 'all') & (summary.metric == 'abs_error_ml')]
  assert len(overall) == 2 * len(L.REGIONS) and (overall.n == len(pairs)).all()
  # PSNR of identical images is inf: left out of the oracle's summary.
  image = summary[(summary.region == 'image') & (summary.grouping == 'all')]
  assert 'psnr_brain' not in set(image[image.method == 'oracle'].metric)
  assert image[(image.method == 'no_change') & (image.metric == 'ssim_brain')].n.item() == len(
      pairs)
  by_interval = summary[(summary.grouping == 'interval') & (summary.metric == 'abs_error_ml')]
  assert set(by_interval.group) == {'0.75-1.5y', '1.5-2.5y'}  # 1- and 2-year pairs


def test_bootstrap_ci_known_answers():
  rng = np.random.default_rng(3)
  for n in (2, 3, 7, 40):  # Skewed data (like absolute errors) still bracket their mean.
    values = rng.lognormal(0, 1.5, n)
    low, high = report.bootstrap_ci(values, seed=n)
    assert low <= values.mean() <= high
  assert report.bootstrap_ci(np.full(5, 2.5)) == (2.5, 2.5)
  assert report.bootstrap_ci(np.array([4.0])) == (4.0, 4.0)
  normal = rng.normal(10.0, 2.0, 400)
  low, high = report.bootstrap_ci(normal, num_bootstrap=4000)
  assert high - low == pytest.approx(2 * 1.96 * normal.std() / np.sqrt(400), rel=0.12)
  assert report.bootstrap_ci(normal, seed=1) == report.bootstrap_ci(normal, seed=1)


def test_report_files_and_self_contained_html(evaluation, tmp_path):
  summary = report.summarize(evaluation.rows)
  out = tmp_path / 'report'
  files = report.write_report(out, evaluation, summary, {'cohort': 'synthetic <test>'},
                              extra_json={'extra.json': {'a': 1}},
                              extra_tables={'Extra': pd.DataFrame({'x': [1]})})
  assert sorted(p.name for p in out.iterdir()) == sorted(
      [*report.REPORT_FILES, 'extra.json'])
  assert set(files) == {*report.REPORT_FILES, 'extra.json'}
  html = (out / 'report.html').read_text()
  assert html.count('<img alt="figure" src="data:image/png;base64,') >= 3
  sources = re.findall(r'src\s*=\s*["\']?([^"\'\s>]*)', html)
  assert sources and all(s.startswith('data:image/png;base64,') for s in sources)
  assert 'href=' not in html and '<link' not in html and '<script' not in html
  assert 'synthetic &lt;test&gt;' in html  # Escaped context.
  pairs_csv = pd.read_csv(out / 'pairs.csv')
  assert len(pairs_csv) == len(evaluation.rows)
  np.testing.assert_allclose(pairs_csv.error_ml, evaluation.rows.error_ml, atol=1e-6)
  assert len(pd.read_csv(out / 'summary.csv')) == len(summary)
  markdown = (out / 'report.md').read_text()
  assert '| method | hippocampus MAE (mL) | hippocampus rate error (%/y) |' in markdown
  assert '| oracle | 0 [0, 0] | 0 [0, 0] |' in markdown
  # A second run refuses the now non-empty folder unless asked to overwrite.
  with pytest.raises(ProgressionError, match='not empty.*overwrite'):
    report.write_report(out, evaluation, summary, {})
  report.write_report(out, evaluation, summary, {}, overwrite=True)
  assert not [p for p in out.iterdir() if p.name.startswith('.')]  # No temporary files left.
  with pytest.raises(ProgressionError, match='is a file'):
    report.check_output_dir(out / 'report.md', overwrite=True)


def test_empty_split_is_an_error(pairs):
  with pytest.raises(ProgressionError, match="split 'test'.*no pairs"):
    report.evaluate_pairs(pairs.iloc[:0], [Oracle()], where="split 'test'")


def test_missing_followup_image_is_named(pairs, synthetic_cohort, tmp_path):
  copy = tmp_path / 'cohort'
  shutil.copytree(synthetic_cohort, copy)
  _, copied = cohort.load_cohort('synthetic', copy)
  missing = copied.followup_image.iloc[1]
  assert missing.startswith(str(copy))
  Path(missing).unlink()
  with pytest.raises(ProgressionError, match=f'follow-up image not found: {re.escape(missing)}'):
    report.evaluate_pairs(copied, [baselines.NoChangeBaseline('labels')])


@pytest.mark.parametrize('change', ['shift', 'shape', 'labels'])
def test_followup_off_the_baseline_grid_is_an_error(pairs, tmp_path, change):
  row = pairs.iloc[0].copy()
  source = row.followup_labels if change == 'labels' else row.followup_image
  image = nib.load(source)
  data, affine = np.asanyarray(image.dataobj), image.affine.copy()
  if change == 'shape':
    data = data[:-2]
  else:
    affine[:3, 3] += 2.0  # Half a voxel: same shape, another world position.
  path = tmp_path / f'moved_{change}.nii.gz'
  nib.save(nib.Nifti1Image(data, affine), path)
  row['followup_labels' if change == 'labels' else 'followup_image'] = str(path)
  with pytest.raises(ProgressionError, match='another voxel grid'):
    report.evaluate_pairs(pd.DataFrame([row]), [Oracle()])


def test_prediction_off_grid_or_with_missing_regions_is_an_error(pairs):
  with pytest.raises(ProgressionError, match="'wrong_grid' predicted an image of shape"):
    report.evaluate_pairs(pairs.iloc[:1], [WrongGrid()])
  with pytest.raises(ProgressionError, match='unique names'):
    report.evaluate_pairs(pairs.iloc[:1], [Oracle(), Oracle()])


def test_tissue_volumes_when_asked(pairs):
  done = []
  result = report.evaluate_pairs(pairs.iloc[:1], [baselines.NoChangeBaseline('tissue')],
                                 volume_method='tissue', progress=lambda d, n: done.append((d, n)))
  assert set(result.rows.region) == set(baselines.TISSUE_REGIONS)
  assert (result.rows.predicted_change_ml == 0).all()
  assert done == [(1, 1)]
  headline = report.headline_table(report.summarize(result.rows), 'tissue')
  assert list(headline.columns)[1] == 'brain MAE (mL)'
