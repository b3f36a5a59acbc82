"""A cohort without label maps: the prior anchors on the tissue model (brain, CSF, GM, WM)."""

import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from progression import forecast, labels, phantom, train
from progression.models import prior, warp
from tests.conftest import tiny_config

_TISSUE_OF = {1: ('csf', 'lateral_ventricles'), 2: ('cortex', 'hippocampus', 'amygdala',
                                                     'thalamus'), 3: ('cerebral_wm',)}


def test_tissue_prior_realises_the_targets():
  anat = phantom.sample_anatomy(np.random.default_rng(1), 192.0)
  world = phantom.world_grid((48, 48, 48), 4.0)
  ids, _ = phantom.render(anat, phantom.anatomical_coordinates(anat, world), 4.0, False)
  seg = np.zeros(ids.shape, np.uint8)
  for tissue_class, regions in _TISSUE_OF.items():
    for region in regions:
      seg[np.isin(ids, labels.REGIONS[region])] = tissue_class
  count = {c: (seg == c).sum() for c in (1, 2, 3)}
  gm, wm = -0.012, -0.006
  target = {'gray_matter': gm, 'white_matter': wm, 'csf': 0.015,
            'brain': (count[2] * gm + count[3] * wm) / (count[2] + count[3])}
  rates = np.log1p([target[r] for r in prior.TISSUE_RATE_REGIONS]).astype(np.float32)
  velocity = prior.prior_velocity(jnp.asarray(seg)[None], jnp.asarray(rates)[None],
                                  jnp.float32([2.0]), prior.tissue_prior_regions(), 2)
  push = warp.integrate_velocity(-velocity, jnp.float32([2.0]), 7, upsample_factor=2)
  jacobian = np.asarray(warp.jacobian_determinant(push)[0])
  masks = {'csf': seg == 1, 'gray_matter': seg == 2, 'white_matter': seg == 3, 'brain': seg >= 2}
  for k, region in enumerate(prior.TISSUE_RATE_REGIONS):
    realised = np.log(jacobian[masks[region]].mean()) / 2.0
    assert realised == pytest.approx(rates[k], abs=0.08 * abs(rates[k]) + 5e-4), region


@pytest.fixture(scope='module')
def unlabelled_workdir(synthetic_cohort, tmp_path_factory):
  """`synthetic_cohort` without its label maps, trained 6 steps (tiny config)."""
  root = tmp_path_factory.mktemp('unlabelled') / 'cohort'
  shutil.copytree(synthetic_cohort, root, ignore=shutil.ignore_patterns('*_dseg.nii.gz'))
  spec = root.parent / 'spec.toml'
  reference = Path(__file__).parents[1] / 'cohorts' / 'synthetic.toml'
  spec.write_text(reference.read_text().replace('labels_required = true',
                                                'labels_required = false'))
  workdir = root.parent / 'train'
  train.train_and_evaluate(tiny_config(root, **{'cohort.spec': str(spec)}), workdir)
  return root, workdir


def test_training_without_labels_anchors_on_the_tissue_model(unlabelled_workdir):
  root, workdir = unlabelled_workdir
  forecaster = forecast.Forecaster.from_checkpoint(workdir)
  assert forecaster.anchored and forecaster.prior_source == 'tissue'
  assert forecaster.regional.volume_method == 'tissue'
  prior_only = forecast.Forecaster(forecaster.config, train.zero_residual(forecaster._params),
                                   forecaster.normalizer, forecaster.regional)
  image = sorted(root.glob('sub-001/ses-M000/anat/*_T1w.nii.gz'))[0]
  cov = {'age_years': 74.0, 'sex': 'F', 'diagnosis': 'AD', 'mmse': 22}
  (result,) = prior_only.forecast(str(image), cov, [2.0])
  assert result.volume_method == 'tissue'
  expected = forecaster.regional.predict_volumes_ml(forecast.as_covariates(cov),
                                                    result.baseline_volumes_ml, 2.0)
  change = expected['brain'] - result.baseline_volumes_ml['brain']
  got = result.volumes_ml['brain'] - result.baseline_volumes_ml['brain']
  assert change < 0
  assert got == pytest.approx(change, rel=0.1)


def test_label_checkpoint_without_labels_anchors_on_its_tissue_model(trained_workdir,
                                                                     synthetic_cohort, caplog):
  """A baseline given without its label map: the prior acts on the tissue model's regions
  with the checkpoint's tissue-volume regional model (warned), not on no prior at all."""
  image_path = str(sorted(synthetic_cohort.glob('sub-001/ses-M000/anat/*_T1w.nii.gz'))[0])
  forecaster = forecast.Forecaster.from_checkpoint(trained_workdir)
  assert forecaster.prior_source == 'labels'
  assert forecaster.tissue_regional.volume_method == 'tissue'
  prior_only = forecast.Forecaster(forecaster.config, train.zero_residual(forecaster._params),
                                   forecaster.normalizer, forecaster.regional,
                                   tissue_regional=forecaster.tissue_regional)
  cov = forecast.as_covariates({'age_years': 74.0, 'sex': 'F', 'diagnosis': 'AD', 'mmse': 22})
  with caplog.at_level('WARNING'):
    (result,) = prior_only.forecast(image_path, cov, [2.0])
    prior_only.forecast(image_path, cov, [1.0])  # another subject: warned once per Forecaster
  assert sum('tissue model' in r.getMessage() and 'without a baseline label map' in
             r.getMessage() for r in caplog.records) == 1
  assert result.volume_method == 'tissue'
  expected = forecaster.tissue_regional.predict_volumes_ml(cov, result.baseline_volumes_ml, 2.0)
  brain_change = expected['brain'] - result.baseline_volumes_ml['brain']
  assert brain_change < -0.005 * result.baseline_volumes_ml['brain']  # AD: atrophy
  got = result.volumes_ml['brain'] - result.baseline_volumes_ml['brain']
  assert got == pytest.approx(brain_change, rel=0.1)
  # CSF, a sulcal rim of one or two voxels on this 8 mm test grid: the direction only.
  csf_change = expected['csf'] - result.baseline_volumes_ml['csf']
  assert (result.volumes_ml['csf'] - result.baseline_volumes_ml['csf']) * csf_change > 0
  for region in ('brain', 'csf', 'gray_matter', 'white_matter'):
    lower, upper = result.intervals_ml[region]
    assert lower < result.volumes_ml[region] < upper, region

  without_fallback = forecast.Forecaster(forecaster.config, prior_only._params,
                                         forecaster.normalizer, forecaster.regional)
  caplog.clear()
  with caplog.at_level('WARNING'):
    (result,) = without_fallback.forecast(image_path, cov, [2.0])
  assert any('prior is off' in r.getMessage() for r in caplog.records)
  assert result.volumes_ml['brain'] == pytest.approx(result.baseline_volumes_ml['brain'])
  assert not result.intervals_ml
