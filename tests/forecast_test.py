"""Forecaster: identity at 0 years, the input's grid and voxel order, known-answer trajectories."""

import nibabel as nib
import numpy as np
import pytest

from progression import cohort, covariates, forecast, io, labels
from progression.evaluation import volumes
from progression.errors import ProgressionError

COVARIATES = {'age_years': 74.0, 'sex': 'F', 'diagnosis': 'MCI', 'mmse': 27, 'apoe4': 1}
# A non-RAS orientation: axes permuted and two of them flipped (voxel axes point S, L, P).
OTHER_AXCODES = ('S', 'L', 'P')


@pytest.fixture(scope='module')
def forecaster(trained_workdir):
  return forecast.Forecaster.from_checkpoint(trained_workdir)


@pytest.fixture(scope='module')
def baseline_files(synthetic_cohort):
  """(T1w path, dseg path) of the first subject's baseline visit."""
  visits = cohort.read_visits(cohort.load_spec('synthetic'), synthetic_cohort)
  first = visits.iloc[0]
  return first['image_path'], first['labels_path']


def reoriented(path, axcodes=OTHER_AXCODES) -> nib.Nifti1Image:
  """The same image in world space, its voxels stored in another axis order (nibabel)."""
  image = nib.load(path)
  ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(image.affine),
                                         nib.orientations.axcodes2ornt(axcodes))
  data = nib.orientations.apply_orientation(np.asarray(image.dataobj), ornt)
  affine = image.affine @ nib.orientations.inv_ornt_aff(ornt, image.shape)
  out = nib.Nifti1Image(data, affine)
  assert nib.aff2axcodes(out.affine) == axcodes
  return out


def to_axcodes(data: np.ndarray, axcodes) -> np.ndarray:
  """RAS-ordered voxels -> the order of `axcodes` (the layout `reoriented` writes)."""
  ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(('R', 'A', 'S')),
                                         nib.orientations.axcodes2ornt(axcodes))
  return nib.orientations.apply_orientation(data, ornt)


def test_zero_years_returns_the_baseline(forecaster, baseline_files):
  image_path, labels_path = baseline_files
  (zero,) = forecaster.forecast(image_path, COVARIATES, [0.0], labels=labels_path)
  source = nib.load(image_path)
  np.testing.assert_allclose(zero.image.get_fdata(), source.get_fdata(), atol=1e-4)
  np.testing.assert_array_equal(np.asarray(zero.labels.dataobj),
                                np.asarray(nib.load(labels_path).dataobj))
  np.testing.assert_allclose(zero.jacobian.get_fdata(), 1.0, atol=1e-6)
  np.testing.assert_allclose(zero.displacement.get_fdata(), 0.0, atol=1e-6)
  assert zero.volume_method == 'labels'
  assert zero.volumes_ml == pytest.approx(zero.baseline_volumes_ml, rel=1e-6)
  assert zero.baseline_volumes_ml['hippocampus'] > 0


def test_non_ras_input_keeps_its_affine_and_voxel_order(forecaster, baseline_files):
  image_path, labels_path = baseline_files
  other, other_labels = reoriented(image_path), reoriented(labels_path)
  ras = forecaster.forecast(image_path, COVARIATES, [0.0, 2.0], labels=labels_path)
  flipped = forecaster.forecast(other, COVARIATES, [0.0, 2.0], labels=other_labels)

  np.testing.assert_array_equal(flipped[0].image.get_fdata(), np.asarray(other.dataobj))
  for got, want in zip(flipped, ras):
    for name in ('image', 'jacobian', 'labels', 'displacement'):
      out = getattr(got, name)
      np.testing.assert_allclose(out.affine, other.affine, atol=1e-9)
      assert out.shape[:3] == other.shape
      expected = to_axcodes(np.asarray(getattr(want, name).dataobj), OTHER_AXCODES)
      np.testing.assert_allclose(np.asarray(out.dataobj), expected, rtol=1e-4, atol=1e-3)
    assert got.volumes_ml == pytest.approx(want.volumes_ml, rel=1e-5)
  # The forecast moved something, so the comparison above is not only about the identity.
  assert not np.allclose(ras[1].jacobian.get_fdata(), 1.0)


def contraction_velocity(forecaster: forecast.Forecaster, rate_per_year: float) -> np.ndarray:
  """Pull-back velocity k (x - c) (model-grid voxels / year) about the grid centre c.

  Its flow pulls from farther out, i.e. tissue contracts towards c: the push-forward
  exp(-t v) scales by exp(-k t) per axis, so every region's volume is V0 exp(-3 k t).
  Sampled on the coarse velocity grid: coarse voxel j sits at model voxel (j + 1/2) f - 1/2.
  """
  f = forecaster.downsize
  coarse = np.indices(forecaster.velocity_shape[:3], dtype=np.float32)
  center = (np.asarray(forecaster.grid.shape, np.float32) - 1) / 2
  x = (coarse + 0.5) * f - 0.5 - center[:, None, None, None]
  return rate_per_year * np.moveaxis(x, 0, -1)


@pytest.mark.parametrize('axcodes', [('R', 'A', 'S'), OTHER_AXCODES])
def test_uniform_contraction_gives_known_monotone_trajectory(forecaster, baseline_files, axcodes):
  image_path, labels_path = baseline_files
  subject = forecaster.prepare(reoriented(image_path, axcodes), reoriented(labels_path, axcodes))
  k, years = 0.05, [0.5, 1.0, 2.0, 4.0]
  trajectory = forecaster.trajectory(subject, contraction_velocity(forecaster, k), years)

  v0 = trajectory[0].baseline_volumes_ml['hippocampus']
  hippocampus = [f.volumes_ml['hippocampus'] for f in trajectory]
  np.testing.assert_allclose(hippocampus, v0 * np.exp(-3 * k * np.asarray(years)), rtol=1e-3)
  assert np.all(np.diff(hippocampus) < 0)
  ids = list(labels.REGIONS['hippocampus'])
  warped = [np.isin(np.asarray(f.labels.dataobj), ids).sum() for f in trajectory]
  count = np.isin(np.asarray(subject.labels.data), ids).sum()
  # Warped labels shrink too (the voxel counts of a ~21-voxel region are too coarse to be
  # monotone step by step; `test_warped_label_volumes_follow_the_jacobian` checks them).
  assert warped[-1] < 0.8 * count

  # Pull-back displacement in world mm: u(x) = (exp(k t) - 1) (x - c), c the grid centre.
  last = trajectory[-1]
  center_mm = subject.gridded.affine[:3, :3] @ ((np.asarray(forecaster.grid.shape) - 1) / 2)
  center_mm += subject.gridded.affine[:3, 3]
  world = nib.affines.apply_affine(last.displacement.affine,
                                   np.moveaxis(np.indices(last.displacement.shape[:3]), 0, -1))
  expected = np.expm1(k * 4.0) * (world - center_mm)
  # Central quarter: scaling and squaring clamps at the grid's edges, which spreads inwards.
  inner = tuple(slice(3 * s // 8, s - 3 * s // 8) for s in last.displacement.shape[:3])
  np.testing.assert_allclose(last.displacement.get_fdata()[inner], expected[inner], atol=2e-2)


def _label_voxels(label_map: np.ndarray) -> dict[str, int]:
  return {name: int(np.isin(label_map, ids).sum()) for name, ids in labels.REGIONS.items()}


def _nearest_neighbour_labels(subject: forecast.Subject, forecast_: forecast.Forecast
                              ) -> np.ndarray:
  """The baseline labels carried forward by nearest neighbour (the old output), canonical."""
  field = forecast_.displacement
  displacement_mm = np.stack([io.from_array(field.get_fdata()[..., a], field.affine).data
                              for a in range(3)], axis=-1)  # world-mm components, RAS order
  shift = displacement_mm @ np.linalg.inv(subject.image.affine[:3, :3]).T
  source = np.moveaxis(np.indices(shift.shape[:3]), 0, -1) + shift
  near = [np.clip(np.rint(source[..., a]), 0, n - 1).astype(int)
          for a, n in enumerate(shift.shape[:3])]
  return subject.labels.data[near[0], near[1], near[2]]


def test_warped_label_volumes_follow_the_jacobian(forecaster, baseline_files):
  """Label voxel counts of the forecast change as the Jacobian-integrated volumes do.

  A uniform contraction of 1.5, 3 and 6 % in volume (realistic atrophy; it moves the
  boundaries of this 4 mm, ~16-voxel-wide brain by < 0.3 voxel): nearest-neighbour labels
  do not change at all; the warped labels lose what the Jacobian says within a voxel-scale
  tolerance: 15 % of the change (the interpolation sees the displacement at voxel centres,
  half a voxel inside a boundary: -4 to -12 % on ellipsoids of 3-10 voxels) plus the dither's
  spread, 2 sqrt(change) + 2 voxels (as if each boundary voxel flipped independently with
  its lost fraction). Measured (Jacobian / labels, voxels): whole brain -49 / -52, -98 / -87,
  -193 / -175; cerebral WM -24 / -24, -48 / -50, -95 / -104; cortex -24 / -31, -47 / -39,
  -92 / -74; lateral ventricles (58 voxels) -0.9 / 0, -1.7 / -5, -3.4 / -3; nearest
  neighbour 0 for every region.
  """
  image_path, labels_path = baseline_files
  subject = forecaster.prepare(image_path, labels_path)
  voxel_ml = subject.image.voxel_volume_ml
  before = _label_voxels(subject.labels.data)
  trajectory = forecaster.trajectory(subject, contraction_velocity(forecaster, 0.005),
                                     [1.0, 2.0, 4.0])
  for f in trajectory:
    after = _label_voxels(io.from_array(np.asarray(f.labels.dataobj), f.labels.affine).data)
    nearest = _label_voxels(_nearest_neighbour_labels(subject, f))
    for region in labels.REGIONS:
      jacobian = (f.volumes_ml[region] - f.baseline_volumes_ml[region]) / voxel_ml
      change = after[region] - before[region]
      tolerance = 0.15 * abs(jacobian) + 2 * np.sqrt(abs(jacobian)) + 2
      assert abs(change - jacobian) <= tolerance, (f.years, region, change, jacobian)
      assert nearest[region] == before[region]  # the old output: no change at all
  whole_brain = [f.volumes_ml['whole_brain'] / f.baseline_volumes_ml['whole_brain'] - 1
                 for f in trajectory]
  np.testing.assert_allclose(whole_brain, np.expm1(-3 * 0.005 * np.array([1.0, 2.0, 4.0])),
                             rtol=0.05)


def test_composition_of_horizons(forecaster, baseline_files):
  """φ_{t1+t2} = φ_{t2}∘φ_{t1} on the model grid: one velocity gives consistent horizons."""
  from progression.models import warp
  image_path, labels_path = baseline_files  # Labels: the anchored generator's prior needs them.
  subject = forecaster.prepare(image_path, labels_path)
  velocity = forecaster.velocity(subject, COVARIATES, years=1.0)[None]
  d = {t: warp.integrate_velocity(velocity, np.array([t], np.float32),
                                  upsample_factor=forecaster.downsize) for t in (1.0, 2.0, 3.0)}
  composed = warp.compose(d[1.0], d[2.0])
  scale = float(np.abs(d[3.0]).max())
  assert scale > 1e-2
  # Up to interpolation error: the displacements are integrated on the coarse velocity grid
  # (8^3 here) and upsampled, so a field that varies from voxel to voxel composes to a few %
  # at its sharpest voxels (5 % at most here) and far better on average (0.2 %).
  error = np.abs(composed - d[3.0])
  assert error.mean() < 0.01 * scale and error.max() < 0.08 * scale
  assert float(np.abs(warp.compose(d[1.0], d[1.0]) - d[3.0]).max()) > 0.2 * scale  # 2 y != 3 y.


def test_counterfactuals_change_only_the_covariates(forecaster, baseline_files):
  image_path, labels_path = baseline_files
  scenarios = {'as_is': {}, 'CN': {'diagnosis': 'CN', 'apoe4': 0},
               'AD': {'diagnosis': 'AD', 'apoe4': 2, 'mmse': 20}}
  result = forecaster.counterfactuals(image_path, COVARIATES, scenarios, [1.0, 3.0],
                                      labels=labels_path)
  plain = forecaster.forecast(image_path, COVARIATES, [1.0, 3.0], labels=labels_path)
  assert list(result) == list(scenarios)
  for got, want in zip(result['as_is'], plain):
    assert got.volumes_ml == pytest.approx(want.volumes_ml, rel=1e-6)
  assert result['CN'][0].baseline_volumes_ml == result['AD'][0].baseline_volumes_ml
  cn = np.asarray(result['CN'][1].jacobian.dataobj)
  ad = np.asarray(result['AD'][1].jacobian.dataobj)
  assert not np.allclose(cn, ad, atol=0, rtol=0)
  table = forecast.volumes_table(result)
  assert list(table.columns[:3]) == ['scenario', 'years', 'region']
  assert len(table) == 3 * 2 * len(labels.REGIONS)


def test_without_labels_volumes_are_jacobian_integrated_tissue(forecaster, baseline_files):
  image_path, _ = baseline_files
  (one,) = forecaster.forecast(image_path, COVARIATES, [1.0])
  assert one.labels is None and one.volume_method == 'tissue'
  assert set(one.volumes_ml) == set(forecast.TISSUE_CLASSES)
  subject = forecaster.prepare(image_path)
  jacobian = io.from_array(one.jacobian.get_fdata(), one.jacobian.affine).data
  brain = np.isin(subject.region_map, forecast.TISSUE_CLASSES['brain'])
  expected = float(jacobian[brain].sum()) * subject.image.voxel_volume_ml
  assert one.volumes_ml['brain'] == pytest.approx(expected, rel=1e-5)


def _outside_grid_warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if 'outside the model grid' in r.getMessage()]


def test_warns_once_when_the_brain_reaches_beyond_the_model_grid(forecaster, baseline_files,
                                                                   tmp_path, caplog):
  image_path, labels_path = baseline_files
  with caplog.at_level('WARNING'):
    forecaster.prepare(image_path, labels_path)
    forecaster.prepare(image_path)
  assert not _outside_grid_warnings(caplog)  # the cohort's brain fits the 128 mm grid
  # The same voxels at 6 mm instead of 4: a 1.5 times larger brain (~150 mm front to back).
  bigger = {}
  for name, path in (('T1w', image_path), ('dseg', labels_path)):
    source = nib.load(path)
    affine = source.affine.copy()
    affine[:3, :3] *= 1.5
    bigger[name] = tmp_path / f'big_{name}.nii.gz'
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj), affine), bigger[name])
  for label_path in (bigger['dseg'], None):
    caplog.clear()
    with caplog.at_level('WARNING'):
      forecaster.prepare(bigger['T1w'], label_path)
    (message,) = _outside_grid_warnings(caplog)
    assert str(bigger['T1w']) in message and '[16, 16, 16] voxels' in message
    assert ('label map' if label_path else 'tissue model') in message


def test_rejects_bad_inputs(forecaster, baseline_files, tmp_path):
  image_path, labels_path = baseline_files
  with pytest.raises(ProgressionError, match='years'):
    forecaster.forecast(image_path, COVARIATES, [-1.0])
  with pytest.raises(ProgressionError, match='diagnosis'):
    forecaster.forecast(image_path, {**COVARIATES, 'diagnosis': 'flu'}, [1.0])
  other_grid = nib.Nifti1Image(np.asarray(nib.load(labels_path).dataobj)[:-2],
                               nib.load(labels_path).affine)
  with pytest.raises(ProgressionError, match="baseline image's voxel grid"):
    forecaster.forecast(image_path, COVARIATES, [1.0], labels=other_grid)
  subject = forecaster.prepare(image_path)
  with pytest.raises(ProgressionError, match='velocity'):
    forecaster.trajectory(subject, np.zeros((3, 3, 3, 3), np.float32), [1.0])
  with pytest.raises(ProgressionError, match='not found'):
    forecast.Forecaster.from_checkpoint(tmp_path / 'absent')
  with pytest.raises(ProgressionError, match='no finished checkpoint'):
    forecast.Forecaster.from_checkpoint(tmp_path)


def test_anchored_forecast_reproduces_the_regional_model_on_the_input_grid(forecaster,
                                                                          baseline_files):
  """With the residual off, the forecast's regional volumes (Jacobian over the input's own
  labels) are the regional model's predictions, at 1 and 3 years, within 8 % of the change
  (whole brain 12 %): on this 8 mm test grid a hippocampus is one or two model voxels, and
  no field on it can give cortex and white matter, one voxel thick, rates of their own, so
  the solve balances whole brain against them and the input-grid correction, which leaves
  them after its first step, closes that gap slowly (here whole brain misses by 8 % at 3
  years, the hippocampus by 4 %; the standard experiment: within 0.001 % for both). (Not the
  amygdalae: they cover no model voxel here, so the prior cannot act.)"""
  from progression import train
  image_path, labels_path = baseline_files
  prior_only = forecast.Forecaster(forecaster.config, train.zero_residual(forecaster._params),
                                   forecaster.normalizer, forecaster.regional)
  cov = forecast.as_covariates(COVARIATES)
  for result in prior_only.forecast(image_path, cov, [1.0, 3.0], labels=labels_path):
    expected = forecaster.regional.predict_volumes_ml(cov, result.baseline_volumes_ml,
                                                      result.years)
    for region, tolerance in (('hippocampus', 0.08), ('lateral_ventricles', 0.08),
                              ('whole_brain', 0.12)):
      change = expected[region] - result.baseline_volumes_ml[region]
      got = result.volumes_ml[region] - result.baseline_volumes_ml[region]
      assert got == pytest.approx(change, rel=tolerance, abs=1e-4), (region, result.years)


def test_readme_quick_start_with_three_fields_forecasts_atrophy(forecaster, synthetic_cohort):
  """README's Python quick start gives 3 of 7 fields: hippocampal atrophy, and the subject's
  true follow-up volumes (labels, synthetic) inside the 90 % intervals."""
  visits = cohort.read_visits(cohort.load_spec('synthetic'), synthetic_cohort)
  subject = visits[visits.subject == visits.subject.iloc[0]].sort_values('years_from_first')
  first = subject.iloc[0]
  given = {'age_years': first['age_years'], 'sex': first['sex'], 'diagnosis': first['diagnosis']}
  assert sum(v is not None for v in covariates.covariates_to_dict(
      forecast.as_covariates(given)).values()) == 3
  years = [float(t) for t in subject['years_from_first'].iloc[1:]]
  results = forecaster.forecast(first['image_path'], given, years, labels=first['labels_path'])
  for result, (_, later) in zip(results, subject.iloc[1:].iterrows()):
    followup_labels = io.load_labels(later['labels_path'])
    truth = volumes.regional_volumes_ml(followup_labels.data, followup_labels.voxel_volume_ml)
    assert result.volumes_ml['hippocampus'] < result.baseline_volumes_ml['hippocampus']
    for region in ('hippocampus', 'whole_brain'):
      lower, upper = result.intervals_ml[region]
      assert lower <= truth[region] <= upper, (region, result.years)


def test_warns_for_a_field_never_missing_in_training(forecaster, baseline_files, caplog):
  image_path, labels_path = baseline_files
  config = forecaster.config.copy_and_resolve_references()
  config.augment.covariate_dropout = 0.0
  shares = {f: 0.0 for f in covariates.FIELDS} | {'apoe4': 0.3}
  strict = forecast.Forecaster(config, forecaster._params, forecaster.normalizer,
                               forecaster.regional, shares)
  without = {k: v for k, v in COVARIATES.items() if k not in ('mmse', 'apoe4')}
  with caplog.at_level('WARNING'):
    strict.forecast(image_path, without, [1.0], labels=labels_path)
    strict.forecast(image_path, without, [2.0], labels=labels_path)  # warned once only
    forecaster.forecast(image_path, without, [1.0], labels=labels_path)  # trained with dropout
  warned = [r.getMessage() for r in caplog.records if 'never learned' in r.getMessage()]
  assert len(warned) == 1 and 'mmse' in warned[0] and 'apoe4' not in warned[0]
