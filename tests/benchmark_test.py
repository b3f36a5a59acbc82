"""Benchmark launcher: JSON schema on a tiny run, summary arithmetic, one compile per train step,
and the PyTorch comparator computing the same function as our generator (when torch is
installed). No timing assertions: speed goals live in BENCHMARKS.md, not in tests."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import benchmark, benchmark_report, benchmark_tasks
from progression import parallel, steps, train
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
TINY = (16, 16, 16)
BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


@pytest.fixture
def fast_compiles():
  """XLA with most optimisations off (as flax's examples test): shorter compiles."""
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


def _positive(tree, *path):
  value = tree
  for key in path:
    value = value[key]
  assert isinstance(value, (int, float)) and value > 0, (path, value)


def test_entry_point_writes_json_with_positive_numbers(tmp_path):
  out = tmp_path / 'bench.json'
  env = {**os.environ, 'JAX_DISABLE_MOST_OPTIMIZATIONS': '1'}  # Short compiles.
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.benchmark', '--config=experiments/configs/tiny.py',
       '--config.loss.dice=0', '--config.loss.volume=0',  # Label terms: 2x compile time.
       '--sizes=16', '--devices=2', '--repetitions=1', '--warmup=0', '--forecast_sizes=16',
       '--input_voxel_mm=8', '--pipeline_source=16', '--pipeline_subjects=2', '--notorch',
       '--matmul_n=256', '--standard_config=experiments/configs/tiny.py',
       '--standard_config.loss.dice=0', '--standard_config.loss.volume=0',
       '--standard_devices=1', f'--out={out}'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(out.read_text())

  assert results['meta']['machine']['cpu_count'] > 0
  assert results['meta']['machine']['versions']['jax']
  _positive(results, 'matmul_peak', 'gflop_per_s')
  gen, standard = results['generator']
  assert (gen['size'], gen['devices'], gen['local_batch']) == ('16x16x16', 2, 2), gen
  assert (standard['model'], standard['size'], standard['devices']) == (
      'standard', '16x16x16', 1), standard
  _positive(standard, 'train', 'per_sample_s')
  for key in ('forward', 'train'):
    for field in ('median_s', 'per_sample_s', 'samples_per_s', 'compile_s', 'flops',
                  'gflop_per_s', 'fraction_of_matmul_peak'):
      _positive(gen, key, field)
  assert np.isfinite(gen['train']['loss'])
  _positive(gen, 'memory', 'maxrss_mib')
  (fc,) = results['forecast']
  assert fc['input'] == '16x16x16' and fc['model_grid'] == [16, 16, 16]
  for path in (('with_labels', 'median_s'), ('tissue', 'median_s'),
               ('stages', 'prepare', 'median_s'), ('stages', 'velocity', 'median_s'),
               ('stages', 'trajectory', 'median_s')):
    _positive(fc, *path)
  assert results['pipeline']['pairs'] == 6  # 2 subjects x 3 visits -> 3 pairs each.
  _positive(results, 'pipeline', 'uncached_pairs_per_s')
  _positive(results, 'pipeline', 'cached_pairs_per_s')
  _positive(results, 'pipeline', 'warm_cache_pairs_per_s')
  assert 'skipped' in results['torch']
  summary = results['summary']
  _positive(summary, 'training_consumption_samples_per_s')
  goals = {g['goal']: g for g in summary['goals']}
  assert any(g.startswith('pipeline cached') and v['met'] is not None for g, v in goals.items())
  forecast_goals = [v for g, v in goals.items()
                    if g.startswith('forecast latency') and 'GPU' not in g]
  assert len(forecast_goals) == 2 and all(v['met'] is None for v in forecast_goals)  # No 120^3.
  assert '| benchmark | 16x16x16 | 2 |' in proc.stdout  # The printed table.
  standard_goals = summary['goal_tables']['2. training at the standard grid (prior on)']
  assert standard_goals and all(g['met'] for g in standard_goals)
  assert all(g['met'] is None for g in summary['goal_tables']['3. accelerator'])
  assert '| not measured | not measured |' in proc.stdout  # GPU rows on a CPU host.


def test_summarize_ratios_and_goals():
  timing = lambda per_sample: {'per_sample_s': per_sample, 'samples_per_s': 1 / per_sample}
  gen = lambda size, devices, fwd, tr: {
      'size': size, 'devices': devices, 'forward': timing(fwd), 'train': timing(tr),
      'velocity': {'forward': {'per_sample_s': 0.1, 'batch': 1, 'by_batch': {'1': 0.1}},
                   'forward_backward': {'per_sample_s': 0.25, 'batch': 2,
                                        'by_batch': {'1': 0.3, '2': 0.25},
                                        'op_time_per_sample_s': {
                                            'convolution': 0.12, 'layout': 0.05, 'other': 0.03,
                                            'total': 0.2, 'share_convolution': 0.6}}}}
  ref = lambda batch, per_sample: {
      'size': '64x64x64', 'batch': batch, 'params': 7, 'threads': 2,
      **{k: {'per_sample_s': per_sample} for k in ('forward', 'train_step', 'velocity_forward',
                                                    'velocity_forward_backward')}}
  results = {
      'config': {'grid': {'shape': [64, 64, 64]}},
      'generator': [gen('64x64x64', 1, 0.5, 2.0), gen('64x64x64', 2, 0.4, 1.6),
                    {'size': '32x32x32', 'devices': 1, 'error': 'boom'}],
      'torch': {'torch': '2.13.0', 'monai': '1.6.1', 'runs': [ref(1, 4.0), ref(2, 0.8)]},
      'forecast': [{'input': '120x144x120', 'with_labels': {'median_s': 6.0},
                    'tissue': {'median_s': 4.0}}],
      'pipeline': {'source': '120x144x120', 'grid': '64x64x64', 'pairs': 12,
                   'cached_pairs_per_s': 10.0 / 1.6, 'warm_cache_pairs_per_s': 3.5 / 1.6,
                   'uncached_pairs_per_s': 1 / 1.6},
      'matmul_peak': {'gflop_per_s': 100.0}}
  summary = benchmark_report.summarize(results)
  (row,) = summary['comparison']
  train_row = row['train_step']
  assert train_row['ratio_batch1'] == pytest.approx(2.0 / 4.0)
  assert train_row['ratio_best'] == pytest.approx(1.6 / 0.8)
  assert (train_row['ours_best'], train_row['torch_best_batch']) == ('2 dev', 2)
  velocity = row['velocity_forward_backward']  # One device, best batch vs best batch.
  assert velocity['ours_1device_s'] == 0.3 and velocity['ours_best'] == 'b=2'
  assert velocity['ratio_best'] == pytest.approx(0.25 / 0.8)
  assert velocity['convolution_ratio_best'] == pytest.approx(0.12 / 0.8)  # Kernels alone.
  assert summary['device_scaling']['64x64x64/2'] == pytest.approx(2.0 / 1.6)
  assert summary['training_consumption_samples_per_s'] == pytest.approx(1 / 1.6)
  met = [(' '.join(g['goal'].split(' ')[:3]), g['met']) for g in summary['goals']]
  assert met == [('velocity network forward+backward', True), ('velocity network forward', True),
                 ('train step achieved', None), ('forecast latency at', None),
                 ('float32 vs bfloat16', None),
                 ('train step s/sample', False), ('forecast latency at', False),
                 ('forecast latency at', True), ('train samples/s 2', True), ('pipeline cached pairs/s', True),
                 ('pipeline cold (parallel', True), ('pipeline cold (one', False)]
  tables = benchmark_report.format_tables(results)
  assert 'error: boom' in tables
  assert '| benchmark | 64x64x64 | 0.12 | 0.05 | 0.03 | 0.2 | 0.6 | 0.15 |' in tables


def test_parse_size():
  assert benchmark.parse_size('64') == (64, 64, 64)
  assert benchmark.parse_size('120x144x120') == (120, 144, 120)
  with pytest.raises(ValueError):
    benchmark.parse_size('64x64')


def test_train_step_compiles_once(fast_compiles):
  """Three pmapped train steps trace and compile the step once."""
  assert jax.local_device_count() == 2
  config = tiny_config('', **{'loss.dice': 0.0, 'loss.volume': 0.0})  # Label terms: 2x compile.
  traces = []

  def counted_step(*args, **kwargs):
    traces.append(1)
    return steps.train_step(*args, **kwargs)

  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event) if (
      event == BACKEND_COMPILE_EVENT) else None
  p_train = parallel.pmap_train_step(
      functools.partial(counted_step, loss_weights=train.loss_weights(config)))
  rstate = parallel.replicate(train.create_train_state(config, jax.random.PRNGKey(0)))
  rng = parallel.replicate(jax.random.PRNGKey(1))
  batch = parallel.shard_batch(benchmark_tasks.random_batch(config, TINY, 2))
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    jax.jit(lambda x: x + 1)(np.arange(3.0))  # The listener sees compiles.
    assert compiles
    per_step = []
    for _ in range(3):
      before = len(compiles)
      rstate, metrics = p_train(rstate, batch, rng)
      jax.block_until_ready(metrics)
      per_step.append(len(compiles) - before)
    assert len(traces) == 1
    assert per_step[0] >= 1 and per_step[1:] == [0, 0], per_step
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_velocity_network_task_with_prior(fast_compiles):
  """The network alone (MLP + U-Net + head, the prior's rates as conditioning) at batches 1
  and 2: the best batch is kept, the other's time recorded."""
  config = tiny_config('')
  assert config.model.prior  # The default.
  params = train.create_train_state(config, jax.random.PRNGKey(0)).params
  result = benchmark_tasks._velocity_network(
      config, params, {'size': TINY, 'repetitions': 1, 'warmup': 0, 'velocity_batches': [1, 2]})
  for key in ('forward', 'forward_backward'):
    r = result[key]
    assert set(r['by_batch']) == {'1', '2'} and r['per_sample_s'] == min(r['by_batch'].values())
    _positive(r, 'flops')
    _positive(r, 'gflop_per_s')
  ops = result['forward_backward']['op_time_per_sample_s']  # Profiled at the best batch.
  _positive(ops, 'convolution')
  assert ops['total'] == pytest.approx(ops['convolution'] + ops['layout'] + ops['other'])
  assert sum(ops[f'share_{k}'] for k in ('convolution', 'layout', 'other')) == pytest.approx(1)


def test_random_batch_carries_prior_inputs():
  config = tiny_config('', **{'loss.dice': 0.0, 'loss.volume': 0.0})
  batch = benchmark_tasks.random_batch(config, TINY, 2)
  from progression.models import prior
  assert batch['prior_log_rates'].shape == (2, len(prior.RATE_REGIONS))
  assert batch['baseline_labels'].shape == (2, *TINY)
  config.model.prior = False
  assert 'prior_log_rates' not in benchmark_tasks.random_batch(config, TINY, 2)


def test_torch_reference_matches_generator(fast_compiles):
  """Same weights, same inputs: the PyTorch + MONAI model gives our velocity, displacement,
  prediction, Jacobian and loss (so the comparison times the same computation)."""
  torch = pytest.importorskip('torch')
  pytest.importorskip('monai')
  from experiments import torch_reference
  from progression import covariates, labels, losses
  assert torch_reference.NUM_CLASSES == labels.NUM_CLASSES
  config = tiny_config('')
  config.model.features = (4, 8, 16)  # Three levels, as the default model.
  config.model.prior = False  # The reference has no prior field (its timing says so).
  model = train.create_model(config)
  params = train.create_train_state(config, jax.random.PRNGKey(0)).params
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(0)  # Perturb: FiLM and the velocity head start at ~0.
  params = jax.tree_util.tree_unflatten(treedef, [
      np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32) for x in leaves])
  batch = benchmark_tasks.random_batch(config, TINY, 2)
  ours = jax.jit(model.apply)({'params': params}, batch['baseline'], batch['years'],
                              batch['covariates'])

  reference = torch_reference.Generator(covariates.ENCODED_DIM, tuple(config.model.features))
  torch_reference.load_flax_params(reference, params)
  channels_first = lambda a: torch.from_numpy(np.moveaxis(a, -1, 1).copy())
  tbatch = {'baseline': channels_first(batch['baseline']),
            'followup': channels_first(batch['followup']),
            'baseline_labels': torch.from_numpy(batch['baseline_labels']),
            'followup_labels': torch.from_numpy(batch['followup_labels'])}
  with torch.no_grad():
    theirs = reference(tbatch['baseline'], torch.from_numpy(batch['years']),
                       torch.from_numpy(batch['covariates']))
    weights = train.loss_weights(config)
    their_loss = torch_reference.total_loss(theirs, tbatch, weights, reference.warp)
  assert float(np.abs(ours['velocity']).max()) > 0.1  # A non-trivial flow.
  for key in ('velocity', 'displacement', 'prediction'):
    np.testing.assert_allclose(np.moveaxis(theirs[key].numpy(), 1, -1), ours[key], atol=2e-4,
                               err_msg=key)
  np.testing.assert_allclose(theirs['jacobian'].numpy(), ours['jacobian'], atol=2e-4)
  our_loss, _ = jax.jit(functools.partial(losses.total_loss, weights=weights))(ours, batch)
  np.testing.assert_allclose(float(their_loss), float(np.mean(our_loss)), rtol=1e-4)


def test_accelerator_task_runs_on_cpu(fast_compiles):
  """The accelerator goals' measurements (meant for a GPU) on this CPU at a tiny size: a bf16
  train step with FLOPs and a share of the bf16 peak, float32 and bfloat16 forecasts of the
  same parameters whose volumes the network moved and which agree to bf16 precision."""
  config = tiny_config('', **{'loss.dice': 0.0, 'loss.volume': 0.0})
  result = benchmark_tasks.accelerator_task(
      {'config': config.to_dict(), 'forecast_size': list(TINY), 'voxel_mm': 8.0, 'years': [3.0],
       'repetitions': 1, 'warmup': 0, 'velocity_head_std': 0.003})
  assert result['backend'] == 'cpu' and result['forecast_size'] == list(TINY)
  _positive(result, 'train_bf16', 'flops')
  assert 0 < result['train_bf16_fraction_of_peak'] < 1
  _positive(result, 'forecast_float32', 'median_s')
  _positive(result, 'forecast_bfloat16', 'median_s')
  assert result['max_relative_change_float32'] > 1e-3  # The network moved the volumes ...
  assert result['max_relative_volume_difference'] < 0.01  # ... the same way in bf16.
  volumes = result['volumes_ml']
  assert volumes['float32'] != volumes['bfloat16']  # Two precisions really ran.
  # On a CPU host the GPU goals stay unmeasured; on a GPU they are read from this task.
  assert benchmark_report._gpu_values({'accelerator': result}) == [None, None, None]
  gpu = {**result, 'backend': 'gpu', 'forecast_size': [120, 144, 120],
         'train_bf16_fraction_of_peak': 0.3, 'forecast_float32': {'median_s': 0.08},
         'forecast_bfloat16': {'median_s': 0.04}, 'max_relative_volume_difference': 2e-4}
  assert benchmark_report._gpu_values({'accelerator': gpu}) == [0.3, 0.04, 2e-4]


@pytest.mark.parametrize('busy,met', [(1.9, True), (1.2, False)])
def test_standard_scaling_goal_accepts_one_device_using_every_core(busy, met):
  """2 forced devices / 1 below 1.0 meets the goal only when one device already keeps >= 90 %
  of the cores busy (then a second program on the same cores has nothing left to use)."""
  timing = lambda per_sample: {'per_sample_s': per_sample, 'samples_per_s': 1 / per_sample}
  std = lambda devices, per_sample, **extra: {
      'model': 'standard', 'size': '96x112x96', 'devices': devices, 'forward': timing(0.3),
      'train': {**timing(per_sample), 'cores_busy': busy}, 'cores': 2, **extra}
  results = {'config': {'grid': {'shape': [96, 112, 96]}},
             'generator': [std(1, 0.8), std(2, 0.85)], 'torch': {'skipped': 'no'},
             'forecast': [], 'pipeline': {}, 'matmul_peak': {}}
  goals = {g['goal']: g for g in benchmark_report.summarize(results)['goal_tables'][
      '2. training at the standard grid (prior on)']}
  busy_row = goals['CPU cores busy during that train step, 1 device (of 2)']
  assert busy_row['value'] == busy
  (scaling,) = [g for text, g in goals.items() if text.startswith('train samples/s 2 devices')]
  assert scaling['value'] == pytest.approx(0.8 / 0.85) and scaling['met'] is met
