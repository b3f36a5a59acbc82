"""progression.evaluation.report and figures with fake methods (no trained model needed)."""

import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from progression import cohort, io, preprocess
from progression import labels as L
from progression.errors import ProgressionError
from progression.evaluation import baselines, comparisons, figures, report


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


class Halfway:
  """'model': the baseline image and volumes halfway to the real follow-up's (|error| is
  half no_change's on every pair x region)."""
  name = 'model'

  def predict(self, pair_row, baseline, baseline_labels):
    before = baselines.measure_volumes_ml(None, baseline_labels, 'labels')
    after = baselines.measure_volumes_ml(None, io.load_labels(pair_row['followup_labels']),
                                         'labels')
    return baselines.Prediction(image=baseline.data,
                                volumes_ml={r: (before[r] + after[r]) / 2 for r in before},
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
  return report.evaluate_pairs(pairs, [Oracle(), Halfway(),
                                       baselines.NoChangeBaseline('labels')])


def test_one_row_per_pair_region_method(pairs, evaluation):
  rows = evaluation.rows
  assert len(rows) == len(pairs) * len(L.REGIONS) * 3
  assert list(rows.columns) == list(report.ROW_COLUMNS)
  assert rows.groupby(['method', 'region']).size().eq(len(pairs)).all()
  assert evaluation.volume_method == 'labels'
  assert len(evaluation.examples) == 2 and set(evaluation.examples[0].predicted) == {
      'oracle', 'model', 'no_change'}


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
  assert len(overall) == 3 * len(L.REGIONS) and (overall.n == len(pairs)).all()
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
  assert ('| method | hippocampus MAE (mL) | hippocampus rate error (%/y) | '
          'hippocampus MAE / no_change | lateral_ventricles MAE (mL) |') in markdown
  # The fake 'oracle' is a reference: marked, and listed after the competitors.
  assert '| oracle (reference) | 0 [0, 0] | 0 [0, 0] | 0 |' in markdown
  assert markdown.index('| model |') < markdown.index('| no_change |') < markdown.index(
      '| oracle (reference) |')
  assert '| model |' in markdown and '| no_change |' in markdown  # What the CLIs check.
  for text in (markdown, html):
    assert figures.REFERENCE_NOTE.replace("'", '&#x27;' if text is html else "'") in text
    assert 'Who wins' in text
  # comparisons.csv: the model against every other method, subject-level.
  paired = comparisons.paired_comparisons(evaluation.rows)
  written = pd.read_csv(out / 'comparisons.csv')
  assert list(written.columns) == list(comparisons.COMPARISON_COLUMNS)
  assert len(written) == len(paired) == 2 * len(L.REGIONS) * 2  # metrics x regions x others
  np.testing.assert_allclose(written.mean_diff, paired.mean_diff, rtol=1e-6, atol=1e-9)
  assert list(written.verdict) == list(paired.verdict)
  assert set(written.versus) == {'no_change', 'oracle'}
  assert (written.is_reference == (written.versus == 'oracle')).all()
  # Who wins: one row per headline region against no_change (the reference is not a rival).
  who = comparisons.who_wins_table(paired, report.HEADLINE_REGIONS['labels'])
  assert list(who['model vs']) == ['no_change'] * 3
  for row in who.itertuples(index=False):
    assert '| ' + ' | '.join(map(str, row)) + ' |' in markdown
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


def test_who_wins_known_answer_model_halves_the_no_change_error(pairs, evaluation):
  paired = comparisons.paired_comparisons(evaluation.rows)
  rows = evaluation.rows[evaluation.rows.method == 'no_change']
  for region in ('whole_brain', 'hippocampus', 'lateral_ventricles'):
    # Halfway's |error| is half no_change's (= |true change|) on every pair.
    per_subject = rows[rows.region == region].groupby('subject').abs_error_ml.mean()
    row = paired[(paired.metric == 'abs_error_ml') & (paired.region == region)
                 & (paired.versus == 'no_change')].iloc[0]
    assert row.n_subjects == 2 and row.n_pairs == len(pairs)
    assert row.mean_diff == pytest.approx(-0.5 * per_subject.mean(), rel=1e-9, abs=1e-12)
    assert row.versus_mae == pytest.approx(per_subject.mean(), rel=1e-9)
    if (per_subject > 0).all():  # Every subject gains: the CI lies below 0.
      assert row.mae_ratio == pytest.approx(0.5) and row.verdict == 'better'
  brain = paired[(paired.region == 'whole_brain') & (paired.versus == 'no_change')]
  assert (brain.verdict == 'better').all()  # Volume and rate error: the brain always shrinks.
  oracle = paired[(paired.metric == 'abs_error_ml') & (paired.versus == 'oracle')
                  & (paired.region == 'whole_brain')].iloc[0]
  assert oracle.is_reference and oracle.verdict == 'worse' and oracle.mae_ratio == np.inf


def test_headline_ratios_and_reference_rows():
  methods = ('oracle', 'model', 'expected', 'population_rate', 'no_change')
  mae = {'oracle': 0.1, 'model': 0.3, 'expected': 0.2, 'population_rate': 0.4,
         'no_change': 0.6}
  records = [{'grouping': 'all', 'group': 'all', 'method': m, 'region': region,
              'metric': metric, 'n': 4, 'mean': mae[m] * scale, 'median': 0.0,
              'ci95_low': 0.0, 'ci95_high': 1.0}
             for m in methods for region, scale in (('hippocampus', 1.0), ('whole_brain', 10.0))
             for metric in ('abs_error_ml', 'abs_rate_error_pct_per_year')]
  table = report.headline_table(pd.DataFrame(records), 'labels')
  assert list(table.method) == ['model', 'population_rate', 'no_change', 'oracle (reference)',
                                'expected (reference)']
  assert list(table.columns[:5]) == [
      'method', 'hippocampus MAE (mL)', 'hippocampus rate error (%/y)',
      'hippocampus MAE / population_rate', 'hippocampus MAE / no_change']
  order = ['model', 'population_rate', 'no_change', 'oracle', 'expected']
  for region in ('hippocampus', 'whole_brain'):
    for baseline in ('population_rate', 'no_change'):
      want = [f'{mae[m] / mae[baseline]:.3g}' for m in order]
      assert list(table[f'{region} MAE / {baseline}']) == want
  assert list(table['lateral_ventricles MAE / no_change']) == ['n/a'] * 5  # Not in summary.
  assert table['hippocampus MAE / population_rate'][0] == '0.75'
  # Without the model (or the baseline) there is no ratio column.
  without = report.headline_table(pd.DataFrame(records).query('method != "model"'), 'labels')
  assert not [c for c in without.columns if ' MAE / ' in c]
  no_rate = report.headline_table(pd.DataFrame(records).query('method != "population_rate"'),
                                  'labels')
  assert [c for c in no_rate.columns if ' MAE / ' in c] == [
      f'{r} MAE / no_change' for r in report.HEADLINE_REGIONS['labels']]


def test_brain_mask_excludes_background_and_extracerebral_csf(pairs, evaluation):
  ids = np.array([0, L.CSF, L.LEFT_LATERAL_VENTRICLE, L.LEFT_HIPPOCAMPUS, L.BRAINSTEM,
                  L.LEFT_CORTEX])
  np.testing.assert_array_equal(report.brain_mask_of_labels(ids),
                                [False, False, True, True, True, True])
  rows = evaluation.rows[(evaluation.rows.method == 'no_change')].drop_duplicates(
      list(report.PAIR_KEY))
  for pair, row in zip(pairs.itertuples(), rows.itertuples()):
    assert (pair.subject, pair.followup_session) == (row.subject, row.followup_session)
    labels = io.load_labels(pair.followup_labels).data
    assert (labels == L.CSF).any()  # The test means something: CSF is there to leave out.
    squared = (preprocess.normalize_intensity(io.load_image(pair.baseline_image).data)
               - preprocess.normalize_intensity(io.load_image(pair.followup_image).data)
               ) ** 2.0
    brain = (labels != 0) & (labels != L.CSF)
    assert row.mse_brain == pytest.approx(squared[brain].mean(), rel=1e-5)
    assert row.mse_brain != pytest.approx(squared[labels > 0].mean(), rel=1e-3)
