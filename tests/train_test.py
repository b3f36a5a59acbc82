"""Training: pmap equivalence, learning on the synthetic cohort, kill -9 resume, multi-process."""

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import nibabel as nib
import pandas as pd
import pytest
from scipy import ndimage

from progression import covariates, input_pipeline, labels, parallel, steps, train
from progression.errors import ProgressionError
from progression.models import prior
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


def _random_batch(num: int, shape=(16, 16, 16), seed=0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  baseline = rng.random((num, *shape, 1), dtype=np.float32)
  classes = rng.integers(0, labels.NUM_CLASSES, (num, *shape)).astype(np.uint8)
  return {
      'baseline': baseline,
      'followup': np.roll(baseline, 1, axis=1),
      'years': rng.uniform(0.5, 3.0, num).astype(np.float32),
      'covariates': rng.standard_normal((num, covariates.ENCODED_DIM)).astype(np.float32),
      'baseline_labels': classes,
      'followup_labels': np.roll(classes, 1, axis=1),
      'prior_log_rates': rng.normal(0.0, 0.03, (num, len(prior.RATE_REGIONS))).astype(np.float32),
  }


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_pmap_step_matches_one_device_on_the_same_global_batch():
  assert jax.local_device_count() == 2
  config = tiny_config('unused')
  # Without the prior's zero-initialised head: its trunk gradients start at exactly 0, and
  # Adam's first step turns their float noise into full-size updates, hiding the comparison.
  config.model.prior = False
  state = train.create_train_state(config, jax.random.PRNGKey(0))
  batch = _random_batch(2)
  weights = train.loss_weights(config)
  rng = jax.random.PRNGKey(1)

  one_device = jax.jit(functools.partial(steps.train_step, loss_weights=weights))
  expected, expected_metrics = one_device(state, batch, rng)

  p_step = parallel.pmap_train_step(functools.partial(steps.train_step, loss_weights=weights))
  rstate, metrics = p_step(parallel.replicate(state), parallel.shard_batch(batch),
                           parallel.replicate(rng))

  for leaf in _leaves(rstate.params):  # Replicas stay identical.
    np.testing.assert_array_equal(leaf[0], leaf[1])
  for got, want in zip(_leaves(parallel.unreplicate(rstate).params), _leaves(expected.params)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  assert int(parallel.unreplicate(rstate).step) == 1
  np.testing.assert_allclose(parallel.unreplicate(metrics)['loss'], expected_metrics['loss'],
                             rtol=1e-5)
  changed = [not np.allclose(a, b) for a, b in zip(_leaves(expected.params), _leaves(state.params))]
  assert any(changed)


def _contracting_copy(cohort_root: Path, out: Path, linear_rate_per_year: float) -> Path:
  """Copies the cohort, replacing each follow-up by its baseline shrunk about the image centre.

  The shrink is linear_rate_per_year * years (a strong, learnable, known change; the
  synthetic cohort's real atrophy is sub-voxel on the 8 mm test grid).
  """
  shutil.copytree(cohort_root, out)
  sessions = sorted(out.glob('sub-*/ses-*/anat/*_T1w.nii.gz'))
  by_subject: dict[str, list[Path]] = {}
  for path in sessions:
    by_subject.setdefault(path.name.split('_')[0], []).append(path)
  for paths in by_subject.values():
    first = paths[0]
    months0 = int(first.name.split('_')[1][5:])
    for path in paths[1:]:
      years = (int(path.name.split('_')[1][5:]) - months0) / 12.0
      scale = 1.0 / (1.0 - linear_rate_per_year * years)  # output voxel -> source voxel.
      for src, dst, order in ((first, path, 1),
                              (Path(str(first).replace('_T1w', '_dseg')),
                               Path(str(path).replace('_T1w', '_dseg')), 0)):
        image = nib.load(src)
        data = np.asarray(image.dataobj)
        center = (np.array(data.shape) - 1) / 2.0
        warped = ndimage.affine_transform(data.astype(np.float32), np.eye(3) * scale,
                                          offset=center - scale * center, order=order)
        nib.save(nib.Nifti1Image(warped.astype(data.dtype), image.affine), dst)
  return out


def test_training_lowers_validation_loss(synthetic_cohort, tmp_path):
  cohort_root = _contracting_copy(synthetic_cohort, tmp_path / 'cohort', 0.08)
  config = tiny_config(cohort_root, num_steps=60, eval_every_steps=60,
                       checkpoint_every_steps=60, log_every_steps=10)
  config.optim.warmup_steps = 10
  data = train.load_experiment_data(config)
  val_set = input_pipeline.PairDataset(data.val, data.grid, tmp_path / 'cache', data.normalizer,
                                       train.fit_regional_model(config, data))
  weights = train.loss_weights(config)
  p_eval = parallel.pmap_eval_step(functools.partial(steps.eval_step, loss_weights=weights))
  initial = train.create_train_state(config, jax.random.PRNGKey(config.seed))
  before = train.evaluate(p_eval, parallel.replicate(initial), val_set, 2)

  train.train_and_evaluate(config, tmp_path / 'work')

  lines = (tmp_path / 'work/metrics.jsonl').read_text().splitlines()
  after = [r for r in map(json.loads, lines) if r['split'] == 'val'][-1]
  assert after['step'] == 60
  # The anchored generator starts at the regional model, which already has the contraction's
  # volume change (the unanchored one started at no change and gained > 10 % here).
  assert after['loss'] < 0.95 * before['loss'], (before, after)
  assert (tmp_path / 'work/tensorboard').is_dir()


def test_refuses_to_resume_with_another_grid(synthetic_cohort, tmp_path):
  train.train_and_evaluate(tiny_config(synthetic_cohort, num_steps=2), tmp_path)
  other = tiny_config(synthetic_cohort, num_steps=4)
  other.model.features = (4, 4)
  with pytest.raises(ProgressionError, match='model'):
    train.train_and_evaluate(other, tmp_path)


def test_missing_cohort_root_is_a_clear_error(tmp_path):
  with pytest.raises(ProgressionError, match='cohort.root'):
    train.train_and_evaluate(tiny_config(''), tmp_path)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_train_and_agree(synthetic_cohort, tmp_path):
  port = _free_port()
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1',
         'PYTHONPATH': str(REPO)}
  procs = [subprocess.Popen([sys.executable, 'tests/distributed_worker.py', str(port), str(i),
                             str(synthetic_cohort), str(tmp_path / 'work'),
                             str(tmp_path / f'params{i}.npz')],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  outputs = [p.communicate(timeout=400)[0].decode() for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  with np.load(tmp_path / 'params0.npz') as a, np.load(tmp_path / 'params1.npz') as b:
    assert len(a.files) > 0
    for key in a.files:
      np.testing.assert_array_equal(a[key], b[key])


def test_residual_gate_keeps_the_residual_only_when_it_helps():
  better = {'headline_volume': 0.1, 'headline_volume_hippocampus': 0.1, 'loss': 9.0}
  prior = {'headline_volume': 0.2, 'headline_volume_hippocampus': 0.2, 'loss': 1.0}
  kept = train.residual_gate(7, better, prior)
  assert kept == {'enabled': True, 'metric': 'headline_volume', 'with_residual': 0.1,
                  'prior_only': 0.2, 'regions_worse': [], 'step': 7}
  assert not train.residual_gate(7, {'loss': 2.0}, {'loss': 1.0})['enabled']
  barely = {**better, 'headline_volume': 0.199}                     # Under the 5 % margin.
  assert not train.residual_gate(7, barely, prior)['enabled']
  one_worse = {**better, 'headline_volume_hippocampus': 0.3}         # Better overall, not here.
  gate = train.residual_gate(7, one_worse, prior)
  assert not gate['enabled'] and gate['regions_worse'] == ['hippocampus']
  config = tiny_config('unused')
  params = train.create_train_state(config, jax.random.PRNGKey(0)).params
  params = {**params, train.RESIDUAL_HEAD: jax.tree_util.tree_map(
      lambda x: x + 1.0, params[train.RESIDUAL_HEAD])}
  zeroed = train.zero_residual(params)
  assert all(not np.any(x) for x in _leaves(zeroed[train.RESIDUAL_HEAD]))
  others = [k for k in params if k != train.RESIDUAL_HEAD]
  for key in others:
    for a, b in zip(_leaves(params[key]), _leaves(zeroed[key])):
      np.testing.assert_array_equal(a, b)


def test_missing_shares_count_each_field_per_pair():
  pairs = pd.DataFrame({'age_years': [70.0, 71.0, None, 72.0], 'sex': ['F', 'M', 'F', None],
                        'diagnosis': ['CN', 'MCI', 'AD', 'CN'], 'mmse': [None] * 4})
  shares = train.missing_shares(pairs)
  assert set(shares) == set(covariates.FIELDS)
  assert shares['age_years'] == 0.25 and shares['sex'] == 0.25
  assert shares['diagnosis'] == 0.0 and shares['mmse'] == 1.0 and shares['apoe4'] == 1.0
