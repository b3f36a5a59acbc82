"""Times training, forecasting and data loading on this machine; the numbers go in BENCHMARKS.md.

  python -m experiments.benchmark --out=benchmark.json
  python -m experiments.benchmark --sizes=32,64,120x144x120 --devices=1,2 --repetitions=5

What is measured (medians of `--repetitions` calls after `--warmup` untimed ones; the first
call and the compile are timed apart):
  * generator: the forward pass (velocity, integration, warp, Jacobian; no loss) and the
    train step (forward, losses, backward, pmean, clipping, AdamW) per sample, for each grid
    in --sizes and each device count in --devices, through `train.create_train_state`,
    `steps.train_step`, `parallel.pmap_train_step` (and `parallel.pmap_eval_step` for the
    forward) with the benchmark config; XLA's cost analysis of the compiled step gives
    FLOPs, hence GFLOP/s against a measured matmul peak;
  * forecast: `forecast.Forecaster` (random parameters) on a synthetic NIfTI of each
    --forecast_sizes, with and without a label map, and its stages;
  * input pipeline: `input_pipeline.train_batch` pairs/s on a synthetic cohort, cold cache
    (first epoch) and cached, against the training step's consumption (samples/s);
  * PyTorch + MONAI (`experiments/torch_reference.py`, the `bench` extra): the same
    generator and velocity network, and the ratios ours / PyTorch; skipped without torch.
Each measurement runs in its own subprocess (the forced CPU device count,
XLA_FLAGS=--xla_force_host_platform_device_count=N, must be set before jax is imported),
which also gives a per-measurement peak RSS. The logic is importable: `run_benchmark`.
"""

import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from absl import app, flags
from ml_collections import config_flags

from experiments.timing import time_calls

REPO = Path(__file__).resolve().parents[1]
Shape = tuple[int, int, int]


def parse_size(text: str) -> Shape:
  """'64' -> (64, 64, 64); '120x144x120' -> (120, 144, 120) (voxels)."""
  parts = [int(p) for p in str(text).lower().split('x')]
  if len(parts) not in (1, 3) or min(parts) < 1:
    raise ValueError(f'size {text!r}: expected N or XxYxZ voxels')
  return tuple(parts * 3) if len(parts) == 1 else tuple(parts)


def size_name(shape: Sequence[int]) -> str:
  return 'x'.join(str(int(s)) for s in shape)


@dataclasses.dataclass(frozen=True)
class Options:
  """What to measure. Sizes in voxels; times in seconds."""
  sizes: tuple[Shape, ...] = ((32, 32, 32), (64, 64, 64), (120, 144, 120))
  devices: tuple[int, ...] = (1, 2)
  repetitions: int = 3
  warmup: int = 1
  forecast_sizes: tuple[Shape, ...] = ((64, 64, 64), (120, 144, 120))
  input_voxel_mm: float = 1.5  # Voxel edge (mm) of the synthetic NIfTI inputs.
  pipeline: bool = True
  pipeline_source: Shape = (120, 144, 120)  # NIfTI grid of the pipeline's synthetic cohort.
  pipeline_subjects: int = 4  # x 3 visits -> 3 pairs per subject.
  torch: bool = True
  torch_sizes: tuple[Shape, ...] = ((64, 64, 64),)
  torch_batches: tuple[int, ...] = (1, 2)  # PyTorch picks oneDNN convs only for batch > 1.
  matmul_n: int | None = None  # Matmul peak size; None: 2048 on CPU, 8192 on GPU.
  worker_timeout_s: float = 1200.0
  # XLA's persistent compilation cache for the workers (None: off; an existing
  # JAX_COMPILATION_CACHE_DIR wins). Compiles read from it are flagged in the results.
  compilation_cache_dir: str | None = '~/.cache/progression/xla-benchmark'


# ------------------------------------------------------------------------- helpers (workers)


def random_batch(config, shape: Sequence[int], batch: int, seed: int = 0) -> dict:
  """Host arrays shaped and typed as `input_pipeline.train_batch` gives them ([batch, ...])."""
  import numpy as np
  from progression import covariates, labels
  rng = np.random.default_rng(seed)
  classes = lambda: rng.integers(0, labels.NUM_CLASSES, (batch, *shape)).astype(np.uint8)
  out = {'baseline': rng.random((batch, *shape, 1), dtype=np.float32),
         'followup': rng.random((batch, *shape, 1), dtype=np.float32),
         'years': rng.uniform(0.5, 3.0, batch).astype(np.float32),
         'covariates': rng.standard_normal((batch, covariates.ENCODED_DIM)).astype(np.float32)}
  if config.loss.dice > 0:
    out['baseline_labels'], out['followup_labels'] = classes(), classes()
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


def compile_step(pmapped, *args) -> dict[str, Any]:
  """AOT-compiles a pmapped step (its executable is reused by later calls).

  Returns compile_s (lowering + XLA compile, seconds), cache_hit (read from the persistent
  cache), and flops (XLA cost analysis of one device's program; None if unavailable).
  """
  start = time.perf_counter()
  with _CacheHits() as cache:
    compiled = pmapped.lower(*args).compile()
  out = {'compile_s': time.perf_counter() - start, 'cache_hit': cache.hits > 0, 'flops': None}
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out['flops'] = float(cost['flops']) if cost and cost.get('flops') else None
  except Exception as e:  # Cost analysis is best effort (not every backend implements it).
    out['cost_analysis_error'] = repr(e)
  return out


# --------------------------------------------------------------------------------- workers


def generator_forward(state, batch) -> dict:
  """The generator's forward pass as an eval-step function for `parallel.pmap_eval_step`:
  per-example means of every output (so XLA computes them all) and the padding flags."""
  import jax.numpy as jnp
  out = state.apply_fn({'params': state.params}, batch['baseline'], batch['years'],
                       batch['covariates'])
  mean = lambda a: jnp.mean(a.reshape(a.shape[0], -1), axis=1)
  return {**{k: mean(v) for k, v in out.items()}, 'valid': batch['valid']}


def generator_task(spec: dict) -> dict:
  """Forward and train step at one grid on `spec['devices']` devices (runs in a subprocess)."""
  import functools
  import jax
  import ml_collections
  import numpy as np
  from progression import parallel, steps, train

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
  result = {'devices': n, 'local_batch': local_batch, 'backend': jax.default_backend()}

  p_forward = parallel.pmap_eval_step(generator_forward)
  result['forward'] = compile_step(p_forward, rstate, eval_batch)
  result['forward'].update(time_calls(
      lambda: jax.block_until_ready(p_forward(rstate, eval_batch)), spec['repetitions'],
      spec['warmup']))

  p_train = parallel.pmap_train_step(functools.partial(steps.train_step, loss_weights=weights))
  result['train'] = compile_step(p_train, rstate, batch, rrng)
  holder = {'state': rstate}

  def train_call():
    holder['state'], metrics = p_train(holder['state'], batch, rrng)  # state is donated
    holder['metrics'] = jax.block_until_ready((holder['state'], metrics))[1]

  result['train'].update(time_calls(train_call, spec['repetitions'], spec['warmup']))
  result['train']['loss'] = float(np.asarray(holder['metrics']['loss'])[0])
  for key in ('forward', 'train'):
    r = result[key]
    r['per_sample_s'] = r['median_s'] / local_batch
    r['samples_per_s'] = local_batch / r['median_s']
    if r['flops']:
      r['gflop_per_s'] = r['flops'] * n / r['median_s'] / 1e9
  if spec.get('velocity'):
    result['velocity'] = _velocity_network(config, state.params, batch, spec)
  result['memory'] = memory()
  return result


def _velocity_network(config, params, batch, spec) -> dict:
  """The velocity network alone (covariate MLP + U-Net + head), forward and forward+backward,
  on one device (for the comparison with PyTorch: it isolates the convolutions)."""
  import jax
  import jax.numpy as jnp
  from progression import train
  model = train.create_model(config)
  image, cov = jnp.asarray(batch['baseline'][0]), jnp.asarray(batch['covariates'][0])
  velocity = lambda p: model.apply({'params': p}, image, cov, method=model.velocity)
  result = {}
  for name, fn in (('forward', velocity),
                   ('forward_backward', jax.grad(lambda p: jnp.mean(jnp.square(velocity(p)))))):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(params).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    r = {'compile_s': time.perf_counter() - start, 'flops': float(cost['flops']),
         **time_calls(lambda: jax.block_until_ready(compiled(params)), spec['repetitions'],
                      spec['warmup'])}
    r['gflop_per_s'] = r['flops'] / r['median_s'] / 1e9
    result[name] = r
  return result


def forecast_task(spec: dict) -> dict:
  """`Forecaster.forecast` latency on a synthetic NIfTI of `spec['size']` voxels."""
  import jax
  import ml_collections
  from progression import cohort, covariates, forecast, synthetic, train

  config = ml_collections.ConfigDict(spec['config'])
  with tempfile.TemporaryDirectory() as tmp:
    root = synthetic.make_cohort(Path(tmp) / 'cohort', n_subjects=1, shape=tuple(spec['size']),
                                 voxel_mm=spec['voxel_mm'], n_visits=2, seed=0, workers=1)
    first = cohort.read_visits(cohort.load_spec('synthetic'), root).iloc[0]
    image, label_map = first['image_path'], first['labels_path']
    cov = cohort.covariates_of(first)
    normalizer = covariates.CovariateNormalizer(age_mean=73.0, age_std=7.0,
                                                education_mean=16.0, education_std=3.0)
    state = train.create_train_state(config, jax.random.PRNGKey(config.seed))
    forecaster = forecast.Forecaster(config, state.params, normalizer)
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
  """`input_pipeline.train_batch` pairs/s over one cold-cache epoch, then a cached one."""
  import ml_collections
  from progression import cohort, covariates, input_pipeline, synthetic, train

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
              'uncached_pairs_per_s': epoch(0), 'cached_pairs_per_s': epoch(1)}
  result['maxrss_mib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return result


def matmul_task(spec: dict) -> dict:
  """Measured float32 matmul peak: median GFLOP/s of an n x n jnp.dot (n: 2048 CPU, 8192 GPU)."""
  import jax
  import jax.numpy as jnp
  n = spec.get('n') or (2048 if jax.default_backend() == 'cpu' else 8192)
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  timing = time_calls(lambda: jax.block_until_ready(dot(a, a)), spec['repetitions'], 2)
  return {'n': n, 'backend': jax.default_backend(), 'device': str(jax.devices()[0]),
          'gflop_per_s': 2 * n ** 3 / timing['median_s'] / 1e9, **timing}


TASKS = {'generator': generator_task, 'forecast': forecast_task, 'pipeline': pipeline_task,
         'matmul': matmul_task}


# ---------------------------------------------------------------------------- orchestration


def _worker_env(devices: int, cache_dir: str | None = None) -> dict[str, str]:
  """This environment with `devices` forced CPU devices and, when `cache_dir` is given and no
  JAX_COMPILATION_CACHE_DIR is set, XLA's persistent compilation cache in `cache_dir`."""
  env = dict(os.environ)
  if cache_dir and 'JAX_COMPILATION_CACHE_DIR' not in env:
    env['JAX_COMPILATION_CACHE_DIR'] = str(Path(cache_dir).expanduser())
  kept = [f for f in env.get('XLA_FLAGS', '').split()
          if not f.startswith('--xla_force_host_platform_device_count')]
  env['XLA_FLAGS'] = ' '.join(kept + [f'--xla_force_host_platform_device_count={devices}'])
  env['PYTHONPATH'] = os.pathsep.join([str(REPO)] + [p for p in [env.get('PYTHONPATH')] if p])
  return env


def _run(argv: list[str], env: dict[str, str], out: Path, timeout_s: float) -> dict:
  """Runs a worker command that writes JSON to `out`; errors come back as {'error': ...}."""
  start = time.perf_counter()
  try:
    proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {'error': f'timed out after {timeout_s:.0f} s'}
  if proc.returncode != 0 or not out.is_file():
    lines = (proc.stderr or proc.stdout).strip().splitlines() or ['(no output)']
    errors = [l for l in lines if re.match(r'^[\w.]*(Error|Exception)\b', l)]
    return {'error': f'exit {proc.returncode}: {(errors or lines)[-1][:500]}'}
  result = json.loads(out.read_text())
  result['wall_s'] = time.perf_counter() - start
  return result


def run_worker(task: str, spec: dict, devices: int, options: 'Options') -> dict:
  """Runs `TASKS[task](spec)` in a fresh Python with `devices` forced CPU devices."""
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / 'result.json'
    argv = [sys.executable, '-m', 'experiments.benchmark',
            f'--worker={json.dumps({"task": task, "spec": spec, "out": str(out)})}']
    return _run(argv, _worker_env(devices, options.compilation_cache_dir), out,
                options.worker_timeout_s)


def run_torch(config, sizes: Sequence[Shape], options: Options) -> dict:
  """PyTorch + MONAI reference (experiments/torch_reference.py) in its own process."""
  missing = [m for m in ('torch', 'monai') if importlib.util.find_spec(m) is None]
  if missing:
    return {'skipped': f'{" and ".join(missing)} not installed; '
                       '`pip install -e .[bench]` (torch==2.13.0, monai) to compare'}
  from progression import covariates
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / 'torch.json'
    weights = {k: float(v) for k, v in config.loss.items()}
    argv = [sys.executable, '-m', 'experiments.torch_reference',
            f'--sizes={",".join(size_name(s) for s in sizes)}',
            f'--features={",".join(str(f) for f in config.model.features)}',
            f'--cond_dim={covariates.ENCODED_DIM}', f'--loss_weights={json.dumps(weights)}',
            f'--batches={",".join(str(b) for b in options.torch_batches)}',
            f'--repetitions={options.repetitions}', f'--warmup={max(options.warmup, 1)}',
            '--threads=2', f'--out={out}']
    return _run(argv, _worker_env(1, options.compilation_cache_dir), out,
                options.worker_timeout_s)


def machine() -> dict[str, Any]:
  """CPU model, core count, load averages and package versions."""
  model = platform.processor()
  try:
    lscpu = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
    model = next(l.split(':', 1)[1].strip() for l in lscpu.splitlines()
                 if l.startswith('Model name'))
  except (OSError, subprocess.CalledProcessError, StopIteration):
    pass
  versions = {}
  for package in ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'torch', 'monai'):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = None
  return {'cpu_model': model, 'cpu_count': os.cpu_count(), 'python': platform.python_version(),
          'versions': versions, 'load_average': list(os.getloadavg())}


def run_benchmark(config, options: Options, out: str | Path | None = None,
                  log: Callable[[str], None] = print) -> dict:
  """Runs every measurement of `options` with `config`; returns (and writes to `out`) the
  results as JSON-compatible dicts. See the module docstring for what is measured."""
  from progression.errors import ProgressionError  # No jax in this process.
  if not options.sizes and not options.forecast_sizes:
    raise ProgressionError('nothing to measure: give --sizes or --forecast_sizes')
  start = time.perf_counter()
  config_json = json.loads(config.to_json())
  meta = {'date_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
          'command': ' '.join(['python -m experiments.benchmark',
                               *map(shlex.quote, sys.argv[1:])]),
          'machine': machine(), 'options': json.loads(json.dumps(dataclasses.asdict(options)))}
  results: dict[str, Any] = {'meta': meta, 'config': config_json, 'generator': [],
                             'forecast': [], 'pipeline': None}
  results['matmul_peak'] = run_worker('matmul', {'repetitions': 5, 'n': options.matmul_n}, 1,
                                      options)
  velocity_sizes = set(options.torch_sizes) if options.torch else set()
  for devices in options.devices:
    for size in options.sizes:
      log(f'generator {size_name(size)} on {devices} device(s)')
      spec = {'config': config_json, 'size': size, 'devices': devices,
              'repetitions': options.repetitions, 'warmup': options.warmup,
              'velocity': devices == 1 and size in velocity_sizes}
      results['generator'].append({'size': size_name(size), 'devices': devices,
                                   **run_worker('generator', spec, devices, options)})
  for size in options.forecast_sizes:
    log(f'forecast {size_name(size)}')
    spec = {'config': config_json, 'size': size, 'voxel_mm': options.input_voxel_mm,
            'years': [1.0], 'repetitions': options.repetitions, 'warmup': options.warmup}
    results['forecast'].append({'input': size_name(size),
                                **run_worker('forecast', spec, 1, options)})
  if options.pipeline:
    log('input pipeline')
    spec = {'config': config_json, 'source': options.pipeline_source,
            'voxel_mm': options.input_voxel_mm, 'subjects': options.pipeline_subjects,
            'global_batch': config.per_device_batch_size * max(options.devices)}
    results['pipeline'] = {'source': size_name(options.pipeline_source),
                           'grid': size_name(config.grid.shape),
                           **run_worker('pipeline', spec, 1, options)}
  if options.torch:
    log('PyTorch + MONAI reference')
    results['torch'] = run_torch(config, options.torch_sizes, options)
  else:
    results['torch'] = {'skipped': 'disabled by --notorch'}
  results['meta']['machine']['load_average_after'] = list(os.getloadavg())
  results['meta']['total_s'] = time.perf_counter() - start
  results['summary'] = summarize(results)
  if out:
    Path(out).write_text(json.dumps(results, indent=1))
  return results


# ---------------------------------------------------------------------------------- report


def _get(d: Any, *keys: str) -> Any:
  for k in keys:
    d = d.get(k) if isinstance(d, dict) else None
  return d


def _ratio(a: float | None, b: float | None) -> float | None:
  return a / b if a and b else None


def _met(value: float | None, test: Callable[[float], bool]) -> bool | None:
  """Whether a goal is met; None when it was not measured."""
  return None if value is None else bool(test(value))


def summarize(results: dict) -> dict:
  """Ratios ours / PyTorch (time; < 1: ours faster), 2-vs-1-device scaling and the goals."""
  gen = {(g['size'], g['devices']): g for g in results['generator'] if 'error' not in g}
  runs = _get(results, 'torch', 'runs') or []
  comparison = []
  measures = {'forward': ('forward', 'per_sample_s'), 'train_step': ('train', 'per_sample_s'),
              'velocity_forward': ('velocity', 'forward', 'median_s'),
              'velocity_forward_backward': ('velocity', 'forward_backward', 'median_s')}
  for size in dict.fromkeys(r['size'] for r in runs):
    ours = {d: g for (s, d), g in gen.items() if s == size}
    refs = {r['batch']: r for r in runs if r['size'] == size}
    row = {'size': size, 'params_torch': next(iter(refs.values()))['params']}
    for key, path in measures.items():
      mine = {d: _get(g, *path) for d, g in ours.items() if _get(g, *path)}
      theirs = {b: r[key]['per_sample_s'] for b, r in refs.items()}
      best_d = min(mine, key=mine.get) if mine else None
      best_b = min(theirs, key=theirs.get)
      row[key] = {'ours_1device_s': mine.get(1), 'ours_best_s': mine.get(best_d),
                  'ours_best_devices': best_d, 'torch_batch1_s': theirs.get(1),
                  'torch_best_s': theirs[best_b], 'torch_best_batch': best_b,
                  'ratio_batch1': _ratio(mine.get(1), theirs.get(1)),
                  'ratio_best': _ratio(mine.get(best_d), theirs[best_b])}
      flops = _get(ours.get(1), *path[:2], 'flops') if path[0] == 'velocity' else None
      if flops:  # Same computation: XLA's FLOP count over each framework's time.
        row[key]['gflop'] = flops / 1e9
        row[key]['ours_gflop_per_s'] = _ratio(flops / 1e9, mine.get(1))
        row[key]['torch_best_gflop_per_s'] = _ratio(flops / 1e9, theirs[best_b])
    comparison.append(row)
  scaling = {}
  for (size, devices), g in gen.items():
    one = gen.get((size, 1))
    if devices > 1 and one:
      scaling[f'{size}/{devices}'] = _ratio(g['train']['samples_per_s'],
                                            one['train']['samples_per_s'])
  peak = _get(results, 'matmul_peak', 'gflop_per_s')
  for g in gen.values():
    for key in ('forward', 'train'):
      g[key]['fraction_of_matmul_peak'] = _ratio(g[key].get('gflop_per_s'), peak)
  goals = []
  at64 = next((r for r in comparison if r['size'] == '64x64x64'), None)
  ratio = at64 and at64['train_step']['ratio_best']
  goals.append({'goal': 'train step s/sample ours/PyTorch at 64^3 (each at its best '
                        'device count / batch)', 'target': '<= 1.0', 'value': ratio,
                'met': _met(ratio, lambda r: r <= 1.0)})
  big = next((f for f in results['forecast'] if f['input'] == '120x144x120'), None)
  latency = _get(big, 'with_labels', 'median_s')
  goals.append({'goal': 'forecast latency at 120x144x120 (s)', 'target': '< 5',
                'value': latency, 'met': _met(latency, lambda t: t < 5.0)})
  for name, value in scaling.items():
    goals.append({'goal': f'train samples/s {name.split("/")[1]} devices / 1 at '
                          f'{name.split("/")[0]}', 'target': '>= 1.0', 'value': value,
                  'met': _met(value, lambda r: r >= 1.0)})
  grid = size_name(results['config']['grid']['shape'])
  consumption = max((g['train']['samples_per_s'] for (s, _), g in gen.items() if s == grid),
                    default=None)
  pipe = results.get('pipeline') or {}
  for key in ('cached_pairs_per_s', 'uncached_pairs_per_s'):
    value = _ratio(pipe.get(key), consumption)
    goals.append({'goal': f'pipeline {key.split("_")[0]} pairs/s / training samples/s at {grid}',
                  'target': '>= 2.0', 'value': value, 'met': _met(value, lambda r: r >= 2.0)})
  return {'comparison': comparison, 'device_scaling': scaling,
          'training_consumption_samples_per_s': consumption, 'goals': goals}


def _f(x: Any, digits: int = 3) -> str:
  if x is None:
    return '-'
  if isinstance(x, bool):
    return 'yes' if x else 'NO'
  if isinstance(x, float):
    return f'{x:.0f}' if abs(x) >= 10 ** digits else f'{x:.{digits}g}'
  return str(x)


def _table(header: Sequence[str], rows: list[Sequence[Any]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  return '\n'.join(lines + ['| ' + ' | '.join(_f(c) for c in r) + ' |' for r in rows])


def format_tables(results: dict) -> str:
  """Markdown tables of `results` (times in seconds, throughput in samples/s)."""
  out = []
  rows = []
  for g in results['generator']:
    if 'error' in g:
      rows.append([g['size'], g['devices'], 'error: ' + g['error'][-200:]] + [''] * 8)
      continue
    fwd, tr = g['forward'], g['train']
    compiled = lambda r: r.get('compile_s') and _f(r['compile_s']) + (
        ' (cache)' if r.get('cache_hit') else '')
    rows.append([g['size'], g['devices'], fwd['per_sample_s'], tr['per_sample_s'],
                 tr['samples_per_s'], compiled(tr),
                 tr.get('flops') and tr['flops'] * g['devices'] / 1e9, tr.get('gflop_per_s'),
                 tr.get('fraction_of_matmul_peak'), _get(g, 'memory', 'maxrss_mib'),
                 compiled(fwd)])
  out.append('Generator (s/sample, medians; fwd = generator forward, train = fwd+losses+bwd+pmean+AdamW)\n' + _table(
      ['grid', 'devices', 'fwd s', 'train s', 'train samples/s', 'train compile s',
       'GFLOP/step', 'GFLOP/s', 'of matmul peak', 'peak RSS MiB', 'fwd compile s'], rows))
  peak = results.get('matmul_peak') or {}
  out.append(f'Matmul peak ({peak.get("n")}^2 float32, {peak.get("backend")}): '
             f'{_f(peak.get("gflop_per_s"))} GFLOP/s')
  rows = [[f['input'], 'x'.join(map(str, f.get('model_grid', []))),
           _get(f, 'with_labels', 'median_s'), _get(f, 'tissue', 'median_s'),
           _get(f, 'stages', 'prepare', 'median_s'), _get(f, 'stages', 'velocity', 'median_s'),
           _get(f, 'stages', 'trajectory', 'median_s'),
           _get(f, 'with_labels', 'first_call_s'), _get(f, 'memory', 'maxrss_mib')]
          if 'error' not in f else [f['input'], 'error: ' + f['error'][-300:]] + [''] * 7
          for f in results['forecast']]
  out.append('Forecast latency per subject (s; one horizon)\n' + _table(
      ['input', 'model grid', 'with labels', 'tissue (no labels)', 'prepare', 'velocity',
       'trajectory', 'first call', 'peak RSS MiB'], rows))
  summary = results.get('summary') or summarize(results)
  pipe = results.get('pipeline')
  if pipe:
    out.append('Input pipeline (pairs/s) vs training consumption (samples/s)\n' + _table(
        ['source', 'grid', 'pairs', 'cold cache', 'cached', 'training consumes'],
        [[pipe['source'], pipe['grid'], pipe.get('pairs'), pipe.get('uncached_pairs_per_s'),
          pipe.get('cached_pairs_per_s'), summary['training_consumption_samples_per_s']]]))
  torch = results.get('torch') or {}
  if 'runs' in torch:
    names = {'forward': 'generator fwd', 'train_step': 'train step',
             'velocity_forward': 'velocity net fwd', 'velocity_forward_backward':
             'velocity net fwd+bwd'}
    rows = [[r['size'], name, c['ours_1device_s'], c['ours_best_s'], c['ours_best_devices'],
             c['torch_batch1_s'], c['torch_best_s'], c['torch_best_batch'], c['ratio_batch1'],
             c['ratio_best']]
            for r in summary['comparison'] for key, name in names.items() for c in [r[key]]]
    out.append(f'Ours vs PyTorch {torch["torch"]} + MONAI {torch["monai"]} '
               f'({torch["runs"][0]["threads"]} threads), s/sample; ratio = ours / PyTorch\n'
               + _table(['grid', 'measure', 'ours 1 dev', 'ours best', 'devices', 'torch b=1',
                         'torch best', 'batch', 'ratio b=1', 'ratio best'], rows))
    out.append('Velocity network GFLOP/s (XLA cost analysis FLOPs / time; ours 1 device, '
               'PyTorch best batch)\n' + _table(
                   ['grid', 'measure', 'GFLOP/sample', 'ours GFLOP/s', 'torch GFLOP/s'],
                   [[r['size'], names[k], r[k].get('gflop'), r[k].get('ours_gflop_per_s'),
                     r[k].get('torch_best_gflop_per_s')]
                    for r in summary['comparison']
                    for k in ('velocity_forward', 'velocity_forward_backward')]))
  else:
    out.append(f'PyTorch: {torch.get("skipped") or torch.get("error")}')
  out.append('Goals\n' + _table(['goal', 'target', 'measured', 'met'],
                                 [[g['goal'], g['target'], g['value'], g['met']]
                                  for g in summary['goals']]))
  return '\n\n'.join(out)


# -------------------------------------------------------------------------------- launcher

_CONFIG = config_flags.DEFINE_config_file(
    'config', str(REPO / 'experiments' / 'configs' / 'benchmark.py'),
    'Experiment configuration whose model, loss and optimiser are timed.')
_SIZES = flags.DEFINE_list('sizes', ['32', '64', '120x144x120'],
                           'Generator grids (voxels): N or XxYxZ, comma separated.')
_DEVICES = flags.DEFINE_list('devices', ['1', '2'], 'Forced CPU device counts (pmap).')
_REPETITIONS = flags.DEFINE_integer('repetitions', Options.repetitions, 'Timed calls.')
_WARMUP = flags.DEFINE_integer('warmup', Options.warmup, 'Untimed calls (the first included).')
_FORECAST_SIZES = flags.DEFINE_list('forecast_sizes', ['64', '120x144x120'],
                                    'Forecast input NIfTI grids (voxels); empty to skip.')
_INPUT_VOXEL_MM = flags.DEFINE_float('input_voxel_mm', Options.input_voxel_mm,
                                     'Voxel edge (mm) of the synthetic NIfTI inputs.')
_PIPELINE = flags.DEFINE_boolean('pipeline', True, 'Time the input pipeline.')
_PIPELINE_SOURCE = flags.DEFINE_string('pipeline_source', '120x144x120',
                                       'NIfTI grid of the pipeline cohort (voxels).')
_PIPELINE_SUBJECTS = flags.DEFINE_integer('pipeline_subjects', Options.pipeline_subjects,
                                          'Subjects (3 visits each) in the pipeline cohort.')
_TORCH = flags.DEFINE_boolean('torch', True, 'Compare with PyTorch + MONAI when installed.')
_TORCH_SIZES = flags.DEFINE_list('torch_sizes', ['64'], 'Grids for the PyTorch comparison.')
_TORCH_BATCHES = flags.DEFINE_list('torch_batches', ['1', '2'], 'PyTorch batch sizes.')
_CACHE_DIR = flags.DEFINE_string(
    'compilation_cache_dir', Options.compilation_cache_dir,
    'Persistent XLA compilation cache of the workers (empty: off, to time every compile).')
_MATMUL_N = flags.DEFINE_integer('matmul_n', 0, 'Matmul peak size n (0: 2048 CPU, 8192 GPU).')
_OUT = flags.DEFINE_string('out', 'benchmark.json', 'Results as JSON.')
_WORKER = flags.DEFINE_string('worker', None, 'Internal: run one measurement (JSON spec).')


def options_from_flags() -> Options:
  sizes = lambda values: tuple(parse_size(v) for v in values if v)
  return Options(
      sizes=sizes(_SIZES.value), devices=tuple(int(d) for d in _DEVICES.value),
      repetitions=_REPETITIONS.value, warmup=_WARMUP.value,
      forecast_sizes=sizes(_FORECAST_SIZES.value), input_voxel_mm=_INPUT_VOXEL_MM.value,
      pipeline=_PIPELINE.value, pipeline_source=parse_size(_PIPELINE_SOURCE.value),
      pipeline_subjects=_PIPELINE_SUBJECTS.value, torch=_TORCH.value,
      torch_sizes=sizes(_TORCH_SIZES.value),
      torch_batches=tuple(int(b) for b in _TORCH_BATCHES.value),
      matmul_n=_MATMUL_N.value or None, compilation_cache_dir=_CACHE_DIR.value or None)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _WORKER.value:
    job = json.loads(_WORKER.value)
    Path(job['out']).write_text(json.dumps(TASKS[job['task']](job['spec'])))
    return
  results = run_benchmark(_CONFIG.value, options_from_flags(), _OUT.value)
  print(format_tables(results))
  print(f'wrote {_OUT.value} ({results["meta"]["total_s"]:.0f} s)')


if __name__ == '__main__':
  from experiments import common
  common.run(main)
