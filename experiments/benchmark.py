"""Times training, forecasting and data loading on this machine; the numbers go in BENCHMARKS.md.

  python -m experiments.benchmark --out=benchmark.json
  python -m experiments.benchmark --sizes=32,64,120x144x120 --devices=1,2 --repetitions=5
  python -m experiments.benchmark --standard_devices= ...   # skip the standard experiment
  bash experiments/gpu_benchmark.sh OUT_DIR                  # on a GPU host (--accelerator)

What is measured (medians of `--repetitions` calls after `--warmup` untimed ones; the first
call and the compile are timed apart):
  * generator: the forward pass (velocity, integration, warp, Jacobian; no loss) and the
    train step (forward, losses, backward, pmean, clipping, AdamW) per sample, for each grid
    in --sizes and each device count in --devices, and the standard experiment
    (--standard_config, its own grid and channels) on --standard_devices, through
    `train.create_train_state`,
    `steps.train_step`, `parallel.pmap_train_step` (and `parallel.pmap_eval_step` for the
    forward) with the benchmark config; XLA's cost analysis of the compiled step gives
    FLOPs, hence GFLOP/s against a measured matmul peak;
  * forecast: `forecast.Forecaster` (random parameters) on a synthetic NIfTI of each
    --forecast_sizes, with and without a label map, and its stages;
  * input pipeline: pairs/s on a synthetic cohort of `input_pipeline.train_batch` with a
    cold cache (first epoch, one thread) and a cached one, and of the parallel cache
    warm-up that training runs first (`PairDataset.warm_cache`), against the training
    step's consumption (samples/s);
  * the velocity network alone (covariate MLP + U-Net + head) forward and forward+backward
    at batch 1 and 2, at the first --torch_sizes grid and the standard one;
  * PyTorch + MONAI (`experiments/torch_reference.py`, the `bench` extra): the same
    generator and velocity network, and the ratios ours / PyTorch; skipped without torch;
  * with --accelerator (for a GPU host; `experiments/gpu_benchmark.sh`): the standard
    config's train step in bfloat16 against the chip's bf16 peak, forecast latency and
    float32 vs bfloat16 regional volumes (`benchmark_tasks.accelerator_task`).
With `model.prior` (the default) our generator computes the regional prior field inside
the forward pass, so the generator and train-step times include it; the PyTorch generator
has no prior (its network sees the prior's rates as conditioning, as ours).
Each measurement runs in its own subprocess (the forced CPU device count,
XLA_FLAGS=--xla_force_host_platform_device_count=N, must be set before jax is imported),
which also gives a per-measurement peak RSS. The logic is importable: `run_benchmark`;
the measurements are in `benchmark_tasks`, the summary and tables in `benchmark_report`.
"""

import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from absl import app, flags
from ml_collections import config_flags

from experiments.benchmark_report import format_tables, size_name, summarize
from experiments.benchmark_tasks import TASKS

REPO = Path(__file__).resolve().parents[1]
Shape = tuple[int, int, int]


def parse_size(text: str) -> Shape:
  """'64' -> (64, 64, 64); '120x144x120' -> (120, 144, 120) (voxels)."""
  parts = [int(p) for p in str(text).lower().split('x')]
  if len(parts) not in (1, 3) or min(parts) < 1:
    raise ValueError(f'size {text!r}: expected N or XxYxZ voxels')
  return tuple(parts * 3) if len(parts) == 1 else tuple(parts)


@dataclasses.dataclass(frozen=True)
class Options:
  """What to measure. Sizes in voxels; times in seconds."""
  sizes: tuple[Shape, ...] = ((32, 32, 32), (64, 64, 64))
  devices: tuple[int, ...] = (1, 2)
  # The standard experiment's config (its own grid and channels) is timed on these device
  # counts, and its velocity network against PyTorch's; () skips it.
  standard_devices: tuple[int, ...] = (1, 2)
  repetitions: int = 3
  warmup: int = 1
  forecast_sizes: tuple[Shape, ...] = ((64, 64, 64), (120, 144, 120))
  input_voxel_mm: float = 1.5  # Voxel edge (mm) of the synthetic NIfTI inputs.
  pipeline: bool = True
  pipeline_source: Shape = (120, 144, 120)  # NIfTI grid of the pipeline's synthetic cohort.
  pipeline_subjects: int = 8  # x 3 visits -> 3 pairs per subject.
  torch: bool = True
  torch_sizes: tuple[Shape, ...] = ((64, 64, 64),)
  torch_batches: tuple[int, ...] = (1, 2)  # PyTorch picks oneDNN convs only for batch > 1.
  # Ours: the velocity network alone runs at these batches too (best batch vs best batch).
  matmul_n: int | None = None  # Matmul peak size; None: 2048 on CPU, 8192 on GPU.
  # The accelerator goals (`benchmark_tasks.accelerator_task`, the standard config in bf16):
  # for a GPU host; on CPU they run too, slowly, and the GPU goals stay "not measured".
  accelerator: bool = False
  accelerator_forecast_size: Shape = (120, 144, 120)
  velocity_head_std: float = 0.003  # Moves regional volumes by up to ~4 % in 3 years.
  worker_timeout_s: float = 1200.0
  # XLA's persistent compilation cache for the workers (None: off; an existing
  # JAX_COMPILATION_CACHE_DIR wins). Compiles read from it are flagged in the results.
  compilation_cache_dir: str | None = '~/.cache/progression/xla-benchmark'


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


def run_torch(config, sizes: Sequence[Shape], options: Options,
              measures: Sequence[str] = ()) -> dict:
  """PyTorch + MONAI reference (experiments/torch_reference.py) in its own process; only
  `measures` of it when given (e.g. the velocity network). Without the regional prior
  (`model.prior`) field: its network sees the prior's rates as extra conditioning inputs,
  as ours, but the generator and train step do not compute the prior field."""
  missing = [m for m in ('torch', 'monai') if importlib.util.find_spec(m) is None]
  if missing:
    return {'skipped': f'{" and ".join(missing)} not installed; '
                       '`pip install -e .[bench]` (torch==2.13.0, monai) to compare'}
  from progression import covariates
  from progression.models import prior
  cond_dim = covariates.ENCODED_DIM + (len(prior.RATE_REGIONS) if config.model.prior else 0)
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / 'torch.json'
    weights = {k: float(v) for k, v in config.loss.items()}
    argv = [sys.executable, '-m', 'experiments.torch_reference',
            f'--sizes={",".join(size_name(s) for s in sizes)}',
            f'--features={",".join(str(f) for f in config.model.features)}',
            f'--cond_dim={cond_dim}', f'--loss_weights={json.dumps(weights)}',
            f'--measures={",".join(measures)}',
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
                  log: Callable[[str], None] = print, standard=None) -> dict:
  """Runs every measurement of `options` with `config` (and of the standard experiment's
  config `standard` at its own grid, when given); returns (and writes to `out`) the results
  as JSON-compatible dicts. See the module docstring for what is measured."""
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
  standard_json = json.loads(standard.to_json()) if standard is not None else None
  if standard_json:
    results['standard_config'] = standard_json
  results['matmul_peak'] = run_worker('matmul', {'repetitions': 5, 'n': options.matmul_n}, 1,
                                      options)
  velocity_sizes = set(options.torch_sizes) if options.torch else set()
  for devices in options.devices:
    for size in options.sizes:
      log(f'generator {size_name(size)} on {devices} device(s)')
      spec = {'config': config_json, 'size': size, 'devices': devices,
              'repetitions': options.repetitions, 'warmup': options.warmup,
              'velocity': devices == 1 and size in velocity_sizes,
              'velocity_batches': list(options.torch_batches)}
      results['generator'].append({'model': 'benchmark', 'size': size_name(size),
                                   'devices': devices,
                                   **run_worker('generator', spec, devices, options)})
  standard_grid = tuple(standard.grid.shape) if standard_json else None
  for devices in (options.standard_devices if standard_json else ()):
    log(f'standard experiment {size_name(standard_grid)} on {devices} device(s)')
    spec = {'config': standard_json, 'size': standard_grid, 'devices': devices,
            'repetitions': options.repetitions, 'warmup': options.warmup,
            'velocity': devices == 1 and options.torch,
            'velocity_batches': list(options.torch_batches)}
    results['generator'].append({'model': 'standard', 'size': size_name(standard_grid),
                                 'devices': devices,
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
  if options.accelerator:
    log('accelerator goals (bf16 train step, forecast latency, float32 vs bfloat16)')
    spec = {'config': standard_json or config_json, 'voxel_mm': options.input_voxel_mm,
            'forecast_size': options.accelerator_forecast_size, 'years': [3.0],
            'repetitions': options.repetitions, 'warmup': options.warmup,
            'velocity_head_std': options.velocity_head_std}
    results['accelerator'] = run_worker('accelerator', spec, 1, options)
  if options.torch:
    log('PyTorch + MONAI reference')
    results['torch'] = run_torch(config, options.torch_sizes, options)
    for run in results['torch'].get('runs', []):
      run['model'] = 'benchmark'
    if standard_json and options.standard_devices and 'runs' in results['torch']:
      log(f'PyTorch + MONAI velocity network at {size_name(standard_grid)} (standard)')
      more = run_torch(standard, [standard_grid], options,
                       measures=('velocity_forward', 'velocity_forward_backward'))
      if 'runs' in more:
        results['torch']['runs'] += [{**run, 'model': 'standard'} for run in more['runs']]
      else:
        results['torch']['standard_error'] = more.get('error') or more.get('skipped')
  else:
    results['torch'] = {'skipped': 'disabled by --notorch'}
  results['meta']['machine']['load_average_after'] = list(os.getloadavg())
  results['meta']['total_s'] = time.perf_counter() - start
  results['summary'] = summarize(results)
  if out:
    Path(out).write_text(json.dumps(results, indent=1))
  return results


# -------------------------------------------------------------------------------- launcher

_CONFIG = config_flags.DEFINE_config_file(
    'config', str(REPO / 'experiments' / 'configs' / 'benchmark.py'),
    'Experiment configuration whose model, loss and optimiser are timed.')
_STANDARD = config_flags.DEFINE_config_file(
    'standard_config', str(REPO / 'experiments' / 'configs' / 'standard.py'),
    'The standard experiment, timed at its own grid and channels (--standard_devices).')
_SIZES = flags.DEFINE_list('sizes', ['32', '64'],
                           'Generator grids (voxels): N or XxYxZ, comma separated.')
_DEVICES = flags.DEFINE_list('devices', ['1', '2'], 'Forced CPU device counts (pmap).')
_STANDARD_DEVICES = flags.DEFINE_list(
    'standard_devices', ['1', '2'], 'Device counts for the standard config; empty to skip it.')
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
_ACCELERATOR = flags.DEFINE_boolean(
    'accelerator', False, 'Measure the accelerator goals (bf16 train step of the standard '
    'config, forecast latency, float32 vs bfloat16 volumes); meant for a GPU host.')
_ACCELERATOR_FORECAST_SIZE = flags.DEFINE_string(
    'accelerator_forecast_size', '120x144x120', 'Input grid of the accelerator forecasts.')
_OUT = flags.DEFINE_string('out', 'benchmark.json', 'Results as JSON.')
_WORKER = flags.DEFINE_string('worker', None, 'Internal: run one measurement (JSON spec).')


def options_from_flags() -> Options:
  sizes = lambda values: tuple(parse_size(v) for v in values if v)
  return Options(
      sizes=sizes(_SIZES.value), devices=tuple(int(d) for d in _DEVICES.value),
      standard_devices=tuple(int(d) for d in _STANDARD_DEVICES.value if d),
      repetitions=_REPETITIONS.value, warmup=_WARMUP.value,
      forecast_sizes=sizes(_FORECAST_SIZES.value), input_voxel_mm=_INPUT_VOXEL_MM.value,
      pipeline=_PIPELINE.value, pipeline_source=parse_size(_PIPELINE_SOURCE.value),
      pipeline_subjects=_PIPELINE_SUBJECTS.value, torch=_TORCH.value,
      torch_sizes=sizes(_TORCH_SIZES.value),
      torch_batches=tuple(int(b) for b in _TORCH_BATCHES.value),
      matmul_n=_MATMUL_N.value or None, compilation_cache_dir=_CACHE_DIR.value or None,
      accelerator=_ACCELERATOR.value,
      accelerator_forecast_size=parse_size(_ACCELERATOR_FORECAST_SIZE.value))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _WORKER.value:
    job = json.loads(_WORKER.value)
    Path(job['out']).write_text(json.dumps(TASKS[job['task']](job['spec'])))
    return
  results = run_benchmark(_CONFIG.value, options_from_flags(), _OUT.value,
                          standard=_STANDARD.value)
  print(format_tables(results))
  print(f'wrote {_OUT.value} ({results["meta"]["total_s"]:.0f} s)')


if __name__ == '__main__':
  from experiments import common
  common.run(main)
