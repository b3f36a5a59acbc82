"""The measurements of `experiments.benchmark`, each run in its own worker process.

A worker is `python -m experiments.benchmark --worker=JSON`; it runs `TASKS[task](spec)`
with the forced CPU device count already set in XLA_FLAGS, and writes the result as JSON.
Imports of jax and the library happen inside the tasks, so the orchestrating process never
initialises a backend.
"""

import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from experiments import op_profile
from experiments.timing import time_calls


def random_batch(config, shape: Sequence[int], batch: int, seed: int = 0) -> dict:
  """Host arrays shaped and typed as `input_pipeline.train_batch` gives them ([batch, ...]);
  with `config.model.prior` also the regional model's rates (the prior is computed in the
  generator, so the timed steps include it)."""
  import numpy as np
  from progression import covariates, labels
  rng = np.random.default_rng(seed)
  classes = lambda: rng.integers(0, labels.NUM_CLASSES, (batch, *shape)).astype(np.uint8)
  out = {'baseline': rng.random((batch, *shape, 1), dtype=np.float32),
         'followup': rng.random((batch, *shape, 1), dtype=np.float32),
         'years': rng.uniform(0.5, 3.0, batch).astype(np.float32),
         'covariates': rng.standard_normal((batch, covariates.ENCODED_DIM)).astype(np.float32)}
  if config.loss.dice > 0 or config.loss.volume > 0 or config.model.prior:
    out['baseline_labels'], out['followup_labels'] = classes(), classes()
  if config.model.prior:  # Annual log change per region, atrophy-sized (-0.5 to -3 %/year).
    from progression.models import prior
    out['prior_log_rates'] = rng.uniform(-0.03, -0.005, (batch, len(prior.RATE_REGIONS))
                                         ).astype(np.float32)
  return out


def memory() -> dict[str, Any]:
  """Peak RSS of this process (MiB) and the device's peak bytes in use where reported."""
  import jax
  stats = jax.local_devices()[0].memory_stats() or {}
  return {'maxrss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          'device_peak_bytes': stats.get('peak_bytes_in_use')}


class _CacheHits:
  """Counts persistent-compilation-cache hits while active (so cached compiles are flagged)."""

  def __enter__(self):
    import jax
    self.hits = 0
    self._listener = lambda event, **kw: setattr(
        self, 'hits', self.hits + (event == '/jax/compilation_cache/cache_hits'))
    jax.monitoring.register_event_listener(self._listener)
    return self

  def __exit__(self, *exc):
    import jax
    jax.monitoring.unregister_event_listener(self._listener)


def compile_step(pmapped, *args, count) -> dict[str, Any]:
  """AOT-compiles a pmapped step (its executable is reused by later calls).

  Returns compile_s (lowering + XLA compile, seconds), cache_hit (read from the persistent
  cache), and flops of one device's program: `lowered_flops(count)`, `count` being the step
  lowered with `native_twin`'s model (None if cost analysis is unavailable).
  """
  start = time.perf_counter()
  with _CacheHits() as cache:
    pmapped.lower(*args).compile()
  return {'compile_s': time.perf_counter() - start, 'cache_hit': cache.hits > 0,
          'flops': lowered_flops(count)}


def native_twin(config):
  """A copy of `config` whose convolutions are XLA's own (`lax.conv`): the program whose FLOPs
  every implementation is credited with. XLA's cost analysis counts our compiled kernels
  (custom calls) as zero FLOPs and the depth-tap form's shifted GEMMs a few % high, so
  GFLOP/s is this one count over each implementation's time (and over PyTorch's)."""
  import ml_collections
  twin = ml_collections.ConfigDict(config.to_dict())
  twin.model.conv_impl = 'native'
  return twin


def lowered_flops(program) -> float | None:
  """FLOPs of a lowered or compiled program by XLA's cost analysis (None if unavailable)."""
  try:
    cost = program.cost_analysis()
  except Exception:  # Cost analysis is best effort (not every backend implements it).
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops']) if cost and cost.get('flops') else None


def generator_forward(state, batch) -> dict:
  """The generator's forward pass as an eval-step function for `parallel.pmap_eval_step`:
  per-example means of every output (so XLA computes them all) and the padding flags."""
  import jax.numpy as jnp
  prior = ({'prior_classes': batch['baseline_labels'], 'prior_log_rates': batch['prior_log_rates']}
           if 'prior_log_rates' in batch else {})
  out = state.apply_fn({'params': state.params}, batch['baseline'], batch['years'],
                       batch['covariates'], **prior)
  mean = lambda a: jnp.mean(a.reshape(a.shape[0], -1), axis=1)
  return {**{k: mean(v) for k, v in out.items()}, 'valid': batch['valid']}


def generator_task(spec: dict) -> dict:
  """Forward and train step at one grid on `spec['devices']` devices (runs in a subprocess)."""
  import functools
  import jax
  import ml_collections
  import numpy as np
  from progression import parallel, steps, train
  from progression.models import layers

  config = ml_collections.ConfigDict(spec['config'])
  shape = tuple(spec['size'])
  config.grid.shape = shape
  n = jax.local_device_count()
  if n != spec['devices']:
    return {'error': f'asked for {spec["devices"]} devices, {jax.default_backend()} has {n}'}
  local_batch = config.per_device_batch_size * n
  weights = train.loss_weights(config)
  state = train.create_train_state(config, jax.random.PRNGKey(config.seed))
  rstate = parallel.replicate(state)
  rrng = parallel.replicate(jax.random.PRNGKey(1))
  batch = parallel.shard_batch(random_batch(config, shape, local_batch))
  eval_batch = {**batch, 'valid': np.ones((n, config.per_device_batch_size), np.float32)}
  result = {'devices': n, 'local_batch': local_batch, 'backend': jax.default_backend(),
            'conv_impl': layers.resolve_impl(config.model.conv_impl)}

  # The same state run by the native-convolution twin: the program whose FLOPs are counted.
  twin_state = rstate.replace(apply_fn=train.create_model(native_twin(config)).apply)
  p_forward = parallel.pmap_eval_step(generator_forward)
  result['forward'] = compile_step(p_forward, rstate, eval_batch,
                                   count=p_forward.lower(twin_state, eval_batch))
  result['forward'].update(time_calls(
      lambda: jax.block_until_ready(p_forward(rstate, eval_batch)), spec['repetitions'],
      spec['warmup']))

  p_train = parallel.pmap_train_step(functools.partial(steps.train_step, loss_weights=weights))
  result['train'] = compile_step(p_train, rstate, batch, rrng,
                                 count=p_train.lower(twin_state, batch, rrng))
  holder = {'state': rstate}

  def train_call():
    holder['state'], metrics = p_train(holder['state'], batch, rrng)  # state is donated
    holder['metrics'] = jax.block_until_ready((holder['state'], metrics))[1]

  cpu_start, wall_start = time.process_time(), time.perf_counter()
  result['train'].update(time_calls(train_call, spec['repetitions'], spec['warmup']))
  # CPU seconds of all the process's threads per wall second: how many cores the step keeps
  # busy (on a 2-core machine, ~2 on one device leaves a second device nothing to gain).
  result['train']['cores_busy'] = ((time.process_time() - cpu_start)
                                   / (time.perf_counter() - wall_start))
  result['cores'] = os.cpu_count()
  result['train']['loss'] = float(np.asarray(holder['metrics']['loss'])[0])
  for key in ('forward', 'train'):
    r = result[key]
    r['per_sample_s'] = r['median_s'] / local_batch
    r['samples_per_s'] = local_batch / r['median_s']
    if r['flops']:
      r['gflop_per_s'] = r['flops'] * n / r['median_s'] / 1e9
  result['memory'] = memory()  # Peak RSS of the generator steps (before the network alone).
  if spec.get('velocity'):
    result['velocity'] = _velocity_network(config, state.params, spec)
  return result


def _velocity_network(config, params, spec) -> dict:
  """The velocity network alone (covariate MLP + U-Net + velocity head; no prior field, no
  integration), forward and forward+backward of mean(v^2), on one device at each batch of
  `spec['velocity_batches']` (as PyTorch's): it isolates the convolutions for the comparison
  with PyTorch. With `config.model.prior` the network also sees the prior's rates."""
  import jax
  import jax.numpy as jnp
  from progression import train
  model, twin = train.create_model(config), train.create_model(native_twin(config))
  network = lambda m, image, cov, rates: m._velocity_head(m._trunk(image, cov, rates))
  result = {}
  for b in spec.get('velocity_batches') or [1]:
    data = random_batch(config, tuple(spec['size']), b, seed=1)
    image, cov = jnp.asarray(data['baseline']), jnp.asarray(data['covariates'])
    rates = jnp.asarray(data['prior_log_rates']) if 'prior_log_rates' in data else None
    velocity = lambda m: lambda p: m.apply({'params': p}, image, cov, rates, method=network)
    programs = lambda m: (('forward', velocity(m)), ('forward_backward', jax.grad(
        lambda p: jnp.mean(jnp.square(velocity(m)(p))))))
    for (name, fn), (_, counted) in zip(programs(model), programs(twin)):
      start = time.perf_counter()
      compiled = jax.jit(fn).lower(params).compile()
      r = {'batch': b, 'compile_s': time.perf_counter() - start,
           'flops': lowered_flops(jax.jit(counted).lower(params)) / b,
           **time_calls(lambda: jax.block_until_ready(compiled(params)), spec['repetitions'],
                        spec['warmup'])}
      r['per_sample_s'] = r['median_s'] / b
      r['gflop_per_s'] = r['flops'] / r['per_sample_s'] / 1e9
      if name == 'forward_backward':  # Where the time goes: convolution kernels or around them.
        profile = op_profile.op_time_by_kind(compiled, lambda: jax.block_until_ready(
            compiled(params)))
        r['op_time_per_sample_s'] = {k: v / b if k in op_profile.KINDS + ('total',) else v
                                     for k, v in profile.items()}
      best = result.get(name)
      r['by_batch'] = {**(best or {}).get('by_batch', {}), str(b): r['per_sample_s']}
      if best is None or r['per_sample_s'] < best['per_sample_s']:
        result[name] = r
      else:
        best['by_batch'] = r['by_batch']
  return result


def _normalizer():
  """A fixed covariate normalisation for the synthetic subjects (no training cohort here)."""
  from progression import covariates
  return covariates.CovariateNormalizer(age_mean=73.0, age_std=7.0, education_mean=16.0,
                                        education_std=3.0)


def synthetic_subject(folder: Path, size: Sequence[int], voxel_mm: float) -> tuple:
  """(image path, label map path, covariates) of a one-subject synthetic cohort in `folder`."""
  from progression import cohort, synthetic
  root = synthetic.make_cohort(folder / 'cohort', n_subjects=1, shape=tuple(size),
                               voxel_mm=voxel_mm, n_visits=2, seed=0, workers=1)
  first = cohort.read_visits(cohort.load_spec('synthetic'), root).iloc[0]
  return first['image_path'], first['labels_path'], cohort.covariates_of(first)


def forecast_task(spec: dict) -> dict:
  """`Forecaster.forecast` latency on a synthetic NIfTI of `spec['size']` voxels."""
  import jax
  import ml_collections
  from progression import forecast, train

  config = ml_collections.ConfigDict(spec['config'])
  with tempfile.TemporaryDirectory() as tmp:
    image, label_map, cov = synthetic_subject(Path(tmp), spec['size'], spec['voxel_mm'])
    state = train.create_train_state(config, jax.random.PRNGKey(config.seed))
    forecaster = forecast.Forecaster(config, state.params, _normalizer())
    years = list(spec['years'])
    reps, warmup = spec['repetitions'], spec['warmup']
    result = {'model_grid': list(config.grid.shape), 'years': years,
              'with_labels': time_calls(
                  lambda: forecaster.forecast(image, cov, years, labels=label_map), reps, warmup),
              'tissue': time_calls(lambda: forecaster.forecast(image, cov, years), reps, 0)}
    subject = forecaster.prepare(image, label_map)
    velocity = forecaster.velocity(subject, cov)
    result['stages'] = {
        'prepare': time_calls(lambda: forecaster.prepare(image, label_map), reps, 0),
        'velocity': time_calls(lambda: forecaster.velocity(subject, cov), reps, 0),
        'trajectory': time_calls(lambda: forecaster.trajectory(subject, velocity, years),
                                 reps, 0)}
  result['memory'] = memory()
  return result


def pipeline_task(spec: dict) -> dict:
  """Pairs/s of `input_pipeline.train_batch` over a cold-cache epoch (one thread) and a
  cached one, and of `PairDataset.warm_cache` (one process per CPU) into a fresh cache."""
  import ml_collections
  from progression import cohort, covariates, input_pipeline, synthetic, train, workers

  config = ml_collections.ConfigDict(spec['config'])
  with tempfile.TemporaryDirectory() as tmp:
    root = synthetic.make_cohort(Path(tmp) / 'cohort', n_subjects=spec['subjects'],
                                 shape=tuple(spec['source']), voxel_mm=spec['voxel_mm'],
                                 n_visits=3, seed=0, workers=1)
    pairs = cohort.make_pairs(cohort.read_visits(cohort.load_spec('synthetic'), root))
    normalizer = covariates.fit_normalizer(
        [cohort.covariates_of(row) for _, row in pairs.iterrows()])
    dataset = input_pipeline.PairDataset(pairs, train.grid_from_config(config),
                                         Path(tmp) / 'cache', normalizer)
    warmed = input_pipeline.PairDataset(pairs, train.grid_from_config(config),
                                        Path(tmp) / 'warmed', normalizer)
    processes = workers.available_cpus()
    start = time.perf_counter()
    warmed.warm_cache(num_workers=processes)
    warm_s = time.perf_counter() - start
    global_batch = spec['global_batch']
    steps_per_epoch = max(len(dataset) // global_batch, 1)

    def epoch(index: int) -> float:
      start = time.perf_counter()
      for step in range(index * steps_per_epoch, (index + 1) * steps_per_epoch):
        input_pipeline.train_batch(dataset, step, global_batch=global_batch, seed=config.seed,
                                   intensity_jitter=config.augment.intensity_jitter,
                                   flip_lr_prob=config.augment.flip_lr_prob)
      return (steps_per_epoch * global_batch) / (time.perf_counter() - start)

    result = {'pairs': len(dataset), 'global_batch': global_batch,
              'uncached_pairs_per_s': epoch(0), 'cached_pairs_per_s': epoch(1),
              'warm_cache_pairs_per_s': len(dataset) / warm_s, 'warm_cache_processes': processes}
  result['maxrss_mib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return result


def matmul_task(spec: dict) -> dict:
  """Measured matmul peak: median GFLOP/s of an n x n jnp.dot in `spec['dtype']` (default
  float32; n: `spec['n']`, else 2048 on CPU, 8192 on GPU)."""
  import jax
  import jax.numpy as jnp
  n = spec.get('n') or (2048 if jax.default_backend() == 'cpu' else 8192)
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), spec.get('dtype', 'float32'))
  dot = jax.jit(jnp.dot)
  timing = time_calls(lambda: jax.block_until_ready(dot(a, a)), spec['repetitions'], 2)
  return {'n': n, 'backend': jax.default_backend(), 'device': str(jax.devices()[0]),
          'gflop_per_s': 2 * n ** 3 / timing['median_s'] / 1e9, **timing}


# Dense bfloat16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by device kind.
NOMINAL_BF16_PEAK = {'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'L40S': 362e12,
                     'L4': 121e12, 'A10': 125e12}


def nominal_bf16_peak(device_kind: str) -> float | None:
  """The data-sheet bf16 peak (FLOP/s) of a device kind such as 'NVIDIA H100 80GB HBM3'."""
  return next((peak for name, peak in NOMINAL_BF16_PEAK.items()
               if name in device_kind.upper().split()
               or any(word.startswith(name + '-') for word in device_kind.upper().split())),
              None)


def accelerator_task(spec: dict) -> dict:
  """The accelerator goals on this process's backend (meant for a GPU; runs anywhere):

  * the standard experiment's train step in bfloat16 (`model.dtype`), its XLA FLOPs / time
    against the chip's bf16 peak (data sheet, else a measured bf16 matmul);
  * forecast latency at `spec['forecast_size']` (float32 and bfloat16 models as configured,
    the prior included);
  * float32 vs bfloat16 forecasts of the same parameters: regional volumes after
    `spec['years']` years, with the prior off and the velocity head's kernel drawn with
    standard deviation `spec['velocity_head_std']`, so the network alone moves the volumes
    (with the prior on, an untrained residual is zero and both precisions give the float32
    prior's volumes).
  """
  import jax
  import ml_collections
  device = jax.devices()[0]
  result = {'backend': jax.default_backend(), 'device_kind': device.device_kind,
            'forecast_size': list(spec['forecast_size'])}
  bf16 = ml_collections.ConfigDict(spec['config'])
  bf16.model.dtype = 'bfloat16'
  train = generator_task({'config': bf16.to_dict(), 'size': tuple(bf16.grid.shape),
                          'devices': jax.local_device_count(), 'repetitions': spec['repetitions'],
                          'warmup': spec['warmup']})
  result['train_bf16'] = train.get('train', train)
  bf16_matmul = matmul_task({'repetitions': 5, 'dtype': 'bfloat16',
                             'n': 8192 if result['backend'] != 'cpu' else 1024})
  result['bf16_matmul_flops_per_s'] = bf16_matmul['gflop_per_s'] * 1e9
  result['bf16_peak_flops_per_s'] = (nominal_bf16_peak(device.device_kind)
                                     or result['bf16_matmul_flops_per_s'])
  flops, seconds = result['train_bf16'].get('flops'), result['train_bf16'].get('median_s')
  if flops and seconds:
    result['train_bf16_fraction_of_peak'] = flops / seconds / result['bf16_peak_flops_per_s']
  result.update(_precision_forecasts(spec))
  return result


def _precision_forecasts(spec: dict) -> dict:
  """Forecast latency of float32 and bfloat16 models as configured, and regional volumes of
  both precisions with the prior off and the velocity head redrawn (same parameters)."""
  import jax
  import ml_collections
  from progression import forecast, train

  def forecaster(config, dtype, params):
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.dtype = dtype
    return forecast.Forecaster(config, params, _normalizer())

  deployed = ml_collections.ConfigDict(spec['config'])
  network_only = ml_collections.ConfigDict(spec['config'])
  network_only.model.prior = False
  params = train.create_train_state(deployed, jax.random.PRNGKey(deployed.seed)).params
  moving = train.create_train_state(network_only, jax.random.PRNGKey(deployed.seed)).params
  head = moving['velocity_head']  # Redrawn at an atrophy-sized scale (training starts ~0).
  moving = {**moving, 'velocity_head': {**head, 'kernel': spec['velocity_head_std'] * (
      jax.random.normal(jax.random.PRNGKey(1), head['kernel'].shape))}}
  years = list(spec['years'])
  out, forecasts = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    image, label_map, cov = synthetic_subject(Path(tmp), spec['forecast_size'], spec['voxel_mm'])
    for dtype in ('float32', 'bfloat16'):
      timed = forecaster(deployed, dtype, params)
      out[f'forecast_{dtype}'] = time_calls(
          lambda: timed.forecast(image, cov, years, labels=label_map), spec['repetitions'],
          spec['warmup'])
      [*_, last] = forecaster(network_only, dtype, moving).forecast(image, cov, years,
                                                                    labels=label_map)
      forecasts[dtype] = last
  f32, b16 = forecasts['float32'].volumes_ml, forecasts['bfloat16'].volumes_ml
  v0 = forecasts['float32'].baseline_volumes_ml
  out['volumes_ml'] = {'baseline': v0, 'float32': f32, 'bfloat16': b16}
  out['max_relative_volume_difference'] = max(abs(b16[r] - f32[r]) / f32[r] for r in f32)
  # The same difference as a share of float32's predicted change (a stricter reading).
  out['max_difference_of_change'] = max(abs(b16[r] - f32[r]) / max(abs(f32[r] - v0[r]), 1e-9)
                                        for r in f32)
  out['max_relative_change_float32'] = max(abs(f32[r] - v0[r]) / v0[r] for r in f32)
  return out


TASKS = {'generator': generator_task, 'forecast': forecast_task, 'pipeline': pipeline_task,
         'matmul': matmul_task, 'accelerator': accelerator_task}
