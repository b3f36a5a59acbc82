"""Summary and markdown tables of `experiments.benchmark` results (no jax needed).

`summarize` turns the raw measurements into ratios ours / PyTorch (time; < 1: ours faster),
2-vs-1-device scaling and the goals of the performance issue; `format_tables` prints what
BENCHMARKS.md records.
"""

from typing import Any, Callable, Sequence


def size_name(shape: Sequence[int]) -> str:
  return 'x'.join(str(int(s)) for s in shape)


def _get(d: Any, *keys: str) -> Any:
  for k in keys:
    d = d.get(k) if isinstance(d, dict) else None
  return d


def _ratio(a: float | None, b: float | None) -> float | None:
  return a / b if a and b else None


def _met(value: float | None, test: Callable[[float], bool]) -> bool | None:
  """Whether a goal is met; None when it was not measured."""
  return None if value is None else bool(test(value))


STANDARD = 'standard'  # The `model` tag of the standard experiment's rows.
# GPU goals (issue 13, part 3): measured only on a GPU host; on CPU they read "not measured".
GPU_GOALS = (
    ('train step achieved FLOP/s / bf16 peak (GPU)', '>= 0.40', lambda f: f >= 0.40),
    ('forecast latency at 120x144x120 (GPU, s)', '< 0.05', lambda t: t < 0.05),
    ('float32 vs bfloat16 forecast, regional volumes (GPU, max relative difference)', '< 0.001',
     lambda d: d < 0.001),
)


def _gpu_values(results: dict) -> list[float | None]:
  """The GPU goals' measured values from `results['accelerator']` (None unless it ran on a
  GPU): bf16 train step / peak, the faster precision's forecast latency at 120x144x120,
  float32 vs bfloat16 volume difference."""
  acc = results.get('accelerator') or {}
  if acc.get('backend') != 'gpu':
    return [None] * len(GPU_GOALS)
  latencies = [_get(acc, f'forecast_{d}', 'median_s') for d in ('float32', 'bfloat16')]
  latency = min((t for t in latencies if t), default=None)
  at_size = acc.get('forecast_size') == [120, 144, 120]
  return [acc.get('train_bf16_fraction_of_peak'), latency if at_size else None,
          acc.get('max_relative_volume_difference')]


def _model(row: dict) -> str:
  return row.get('model', 'benchmark')


def summarize(results: dict) -> dict:
  """Ratios ours / PyTorch (time; < 1: ours faster), 2-vs-1-device scaling and the goals,
  grouped as `goal_tables` (one table per goal of the performance issue)."""
  gen = {(_model(g), g['size'], g['devices']): g for g in results['generator']
         if 'error' not in g}
  runs = _get(results, 'torch', 'runs') or []
  comparison = []
  measures = {'forward': ('forward', 'per_sample_s'), 'train_step': ('train', 'per_sample_s'),
              'velocity_forward': ('velocity', 'forward', 'per_sample_s'),
              'velocity_forward_backward': ('velocity', 'forward_backward', 'per_sample_s')}
  for model, size in dict.fromkeys((_model(r), r['size']) for r in runs):
    ours = {d: g for (m, s, d), g in gen.items() if (m, s) == (model, size)}
    refs = {r['batch']: r for r in runs if (_model(r), r['size']) == (model, size)}
    row = {'model': model, 'size': size, 'params_torch': next(iter(refs.values()))['params']}
    for key, path in measures.items():
      theirs = {b: r[key]['per_sample_s'] for b, r in refs.items() if key in r}
      if not theirs:
        continue
      if path[0] == 'velocity':  # One device, best of the batches (as PyTorch's).
        v = _get(ours.get(1), *path[:2]) or {}
        mine = {'1': _get(v, 'by_batch', '1') or (v.get('per_sample_s')
                                                 if v.get('batch', 1) == 1 else None)}
        best_label, best = (f'b={v.get("batch")}', v.get('per_sample_s')) if v else (None, None)
      else:
        mine_d = {d: _get(g, *path) for d, g in ours.items() if _get(g, *path)}
        mine = {'1': mine_d.get(1)}
        best_d = min(mine_d, key=mine_d.get) if mine_d else None
        best_label, best = (f'{best_d} dev' if best_d else None), mine_d.get(best_d)
      best_b = min(theirs, key=theirs.get)
      row[key] = {'ours_1device_s': mine['1'], 'ours_best_s': best, 'ours_best': best_label,
                  'torch_batch1_s': theirs.get(1), 'torch_best_s': theirs[best_b],
                  'torch_best_batch': best_b, 'ratio_batch1': _ratio(mine['1'], theirs.get(1)),
                  'ratio_best': _ratio(best, theirs[best_b])}
      flops = _get(ours.get(1), *path[:2], 'flops') if path[0] == 'velocity' else None
      if flops:  # Same computation: XLA's FLOP count over each framework's time.
        row[key]['gflop'] = flops / 1e9
        row[key]['ours_gflop_per_s'] = _ratio(flops / 1e9, best)
        row[key]['torch_best_gflop_per_s'] = _ratio(flops / 1e9, theirs[best_b])
      ops = _get(ours.get(1), *path[:2], 'op_time_per_sample_s') if path[0] == 'velocity' else None
      if ops:  # Op time by kind at our best batch; the convolution kernels alone vs PyTorch.
        row[key]['op_time_per_sample_s'] = ops
        row[key]['convolution_ratio_best'] = _ratio(ops['convolution'], theirs[best_b])
    comparison.append(row)
  scaling = {}
  for (model, size, devices), g in gen.items():
    one = gen.get((model, size, 1))
    if devices > 1 and one:
      name = f'{size}/{devices}' + (f' ({model})' if model != 'benchmark' else '')
      scaling[name] = _ratio(g['train']['samples_per_s'], one['train']['samples_per_s'])
  peak = _get(results, 'matmul_peak', 'gflop_per_s')
  for g in gen.values():
    for key in ('forward', 'train'):
      g[key]['fraction_of_matmul_peak'] = _ratio(g[key].get('gflop_per_s'), peak)

  def goal(text, target, value, test):
    return {'goal': text, 'target': target, 'value': value, 'met': _met(value, test)}

  velocity = []
  for row in comparison:
    for key, what in (('velocity_forward_backward', 'forward+backward'),
                      ('velocity_forward', 'forward')):
      if key in row:
        velocity.append(goal(f'velocity network {what} ours/PyTorch at {row["size"]} '
                             f'({row["model"]}; best batch each)', '<= 1.0',
                             row[key]['ratio_best'], lambda r: r <= 1.0))
  standard = []
  std_rows = sorted((d, g) for (m, _, d), g in gen.items() if m == STANDARD)
  for devices, g in std_rows:
    standard.append(goal(f'train step s/sample at {g["size"]} (standard), {devices} device(s)',
                         'measured', g['train']['per_sample_s'], lambda t: t > 0))
    standard.append(goal(f'peak RSS (MiB) of that train step, {devices} device(s)', 'measured',
                         _get(g, 'memory', 'maxrss_mib'), lambda m: m > 0))
  one = dict(std_rows).get(1)
  busy, cores = _get(one, 'train', 'cores_busy'), one and one.get('cores')
  if busy is not None:
    standard.append(goal(f'CPU cores busy during that train step, 1 device (of {cores})',
                         'measured', busy, lambda b: b > 0))
  all_busy = bool(busy and cores and busy >= 0.9 * cores)
  for name, value in scaling.items():
    if f'({STANDARD})' in name:
      standard.append(goal(f'train samples/s {name.split("/")[1].split(" ")[0]} devices / 1 '
                           f'at {name.split("/")[0]} (standard)',
                           '>= 1.0, or 1 device keeps >= 90 % of the cores busy', value,
                           lambda r: r >= 1.0 or all_busy))
  gpu_goals = [goal(text, target, value, test)
                for (text, target, test), value in zip(GPU_GOALS, _gpu_values(results))]
  other = []
  at64 = next((r for r in comparison if r['size'] == '64x64x64' and 'train_step' in r), None)
  ratio = at64 and at64['train_step']['ratio_best']
  other.append(goal('train step s/sample ours/PyTorch at 64^3 (each at its best device count / '
                    'batch; ours includes the prior field, PyTorch has none)', '<= 1.0', ratio,
                    lambda r: r <= 1.0))
  big = next((f for f in results['forecast'] if f['input'] == '120x144x120'), None)
  for key, what in (('with_labels', 'with a label map'), ('tissue', 'tissue model, no labels')):
    latency = _get(big, key, 'median_s')
    other.append(goal(f'forecast latency at 120x144x120, {what} (s)', '< 5', latency,
                      lambda t: t < 5.0))
  for name, value in scaling.items():
    if f'({STANDARD})' not in name:
      other.append(goal(f'train samples/s {name.split("/")[1]} devices / 1 at '
                        f'{name.split("/")[0]}', '>= 1.0', value, lambda r: r >= 1.0))
  grid = size_name(results['config']['grid']['shape'])
  consumption = max((g['train']['samples_per_s'] for (_, s, _), g in gen.items() if s == grid),
                    default=None)  # The standard experiment's rows count when on this grid.
  pipe = results.get('pipeline') or {}
  for key, what in (('cached_pairs_per_s', 'cached'),
                    ('warm_cache_pairs_per_s', 'cold (parallel cache warm-up)'),
                    ('uncached_pairs_per_s', 'cold (one thread, no warm-up)')):
    value = _ratio(pipe.get(key), consumption)
    other.append(goal(f'pipeline {what} pairs/s / training samples/s at {grid}', '>= 2.0',
                      value, lambda r: r >= 2.0))
  tables = {'1. velocity network vs PyTorch (oneDNN)': velocity,
            '2. training at the standard grid (prior on)': standard,
            '3. accelerator': gpu_goals, 'earlier goals': other}
  return {'comparison': comparison, 'device_scaling': scaling,
          'training_consumption_samples_per_s': consumption,
          'goals': [g for rows in tables.values() for g in rows], 'goal_tables': tables}


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
      rows.append([_model(g), g['size'], g['devices'], 'error: ' + g['error'][-200:]] + [''] * 8)
      continue
    fwd, tr = g['forward'], g['train']
    compiled = lambda r: r.get('compile_s') and _f(r['compile_s']) + (
        ' (cache)' if r.get('cache_hit') else '')
    rows.append([_model(g), g['size'], g['devices'], fwd['per_sample_s'], tr['per_sample_s'],
                 tr['samples_per_s'], compiled(tr),
                 tr.get('flops') and tr['flops'] * g['devices'] / 1e9, tr.get('gflop_per_s'),
                 tr.get('fraction_of_matmul_peak'), _get(g, 'memory', 'maxrss_mib'),
                 compiled(fwd)])
  impls = sorted({g['conv_impl'] for g in results.get('generator', []) if g.get('conv_impl')})
  out.append('Generator (s/sample, medians; fwd = generator forward, '
             'train = fwd+losses+bwd+pmean+AdamW; convolutions: '
             f'{", ".join(impls) or "not recorded"})\n' + _table(
      ['config', 'grid', 'devices', 'fwd s', 'train s', 'train samples/s', 'train compile s',
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
        ['source', 'grid', 'pairs', 'cold, one thread', 'cold, warm-up processes',
         'warm-up pairs/s', 'cached', 'training consumes'],
        [[pipe['source'], pipe['grid'], pipe.get('pairs'), pipe.get('uncached_pairs_per_s'),
          pipe.get('warm_cache_processes'), pipe.get('warm_cache_pairs_per_s'),
          pipe.get('cached_pairs_per_s'), summary['training_consumption_samples_per_s']]]))
  torch = results.get('torch') or {}
  if 'runs' in torch:
    names = {'forward': 'generator fwd', 'train_step': 'train step',
             'velocity_forward': 'velocity net fwd', 'velocity_forward_backward':
             'velocity net fwd+bwd'}
    rows = [[r['model'], r['size'], name, c['ours_1device_s'], c['ours_best_s'],
             c['ours_best'], c['torch_batch1_s'], c['torch_best_s'], c['torch_best_batch'],
             c['ratio_batch1'], c['ratio_best']]
            for r in summary['comparison'] for key, name in names.items() if key in r
            for c in [r[key]]]
    out.append(f'Ours vs PyTorch {torch["torch"]} + MONAI {torch["monai"]} '
               f'({torch["runs"][0]["threads"]} threads), s/sample; ratio = ours / PyTorch\n'
               + _table(['config', 'grid', 'measure', 'ours 1 dev b=1', 'ours best', 'at',
                         'torch b=1', 'torch best', 'batch', 'ratio b=1', 'ratio best'], rows))
    out.append('Velocity network GFLOP/s (FLOPs: XLA cost analysis of the same network with '
               "XLA's own convolutions; / time, each at its best batch)\n" + _table(
                   ['config', 'grid', 'measure', 'GFLOP/sample', 'ours GFLOP/s', 'torch GFLOP/s'],
                   [[r['model'], r['size'], names[k], r[k].get('gflop'),
                     r[k].get('ours_gflop_per_s'), r[k].get('torch_best_gflop_per_s')]
                    for r in summary['comparison']
                    for k in ('velocity_forward', 'velocity_forward_backward') if k in r]))
    profiled = [(r, r['velocity_forward_backward']) for r in summary['comparison']
                if _get(r, 'velocity_forward_backward', 'op_time_per_sample_s')]
    if profiled:
      out.append('Velocity network fwd+bwd op time by kind (s/sample at our best batch; XLA '
                 'profile, experiments/op_profile.py; convolution kernels = ours (compiled) and '
                 "XLA's convolutions and dots; layout = transposes and copies with the work fused "
                 'into them)\n' + _table(
                     ['config', 'grid', 'convolution kernels', 'layout', 'other', 'op total',
                      'convolution share', 'convolution kernels alone / PyTorch'],
                     [[r['model'], r['size'], c['op_time_per_sample_s']['convolution'],
                       c['op_time_per_sample_s']['layout'], c['op_time_per_sample_s']['other'],
                       c['op_time_per_sample_s']['total'],
                       c['op_time_per_sample_s']['share_convolution'],
                       c['convolution_ratio_best']] for r, c in profiled]))
  else:
    out.append(f'PyTorch: {torch.get("skipped") or torch.get("error")}')
  acc = results.get('accelerator')
  if acc:
    tera = lambda flops, seconds=1.0: _ratio(flops, seconds and seconds * 1e12)
    row = ([acc['backend'], acc['device_kind'], _get(acc, 'train_bf16', 'per_sample_s'),
            tera(_get(acc, 'train_bf16', 'flops'), _get(acc, 'train_bf16', 'median_s')),
            tera(acc.get('bf16_peak_flops_per_s')), acc.get('train_bf16_fraction_of_peak'),
            'x'.join(map(str, acc.get('forecast_size', []))),
            _get(acc, 'forecast_float32', 'median_s'), _get(acc, 'forecast_bfloat16', 'median_s'),
            acc.get('max_relative_volume_difference'), acc.get('max_difference_of_change')]
           if 'error' not in acc else [acc.get('backend', '?'), 'error: ' + acc['error'][-300:]]
           + [''] * 9)
    out.append('Accelerator measurements (standard config: train step in bfloat16; forecast '
               'latency as configured; volumes of float32 vs bfloat16, prior off)\n' + _table(
                   ['backend', 'device', 'bf16 train s/sample', 'TFLOP/s', 'bf16 peak TFLOP/s',
                    'of peak', 'forecast input', 'forecast f32 s', 'forecast bf16 s',
                    'volumes max rel. difference', 'of the predicted change'], [row]))
  tables = summary.get('goal_tables') or {'': summary['goals']}
  for title, goals in tables.items():
    out.append(f'Goals {title}\n' + _table(
        ['goal', 'target', 'measured', 'met'],
        [[g['goal'], g['target'], 'not measured' if g['value'] is None else g['value'],
          'not measured' if g['met'] is None else g['met']] for g in goals]
        or [['(nothing measured for this goal in this run)', '', '', '']]))
  return '\n\n'.join(out)
