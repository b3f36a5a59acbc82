"""Tests for progression.input_pipeline (cache warm-up, batch determinism) and workers."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from progression import input_pipeline, train, workers
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


def _dataset(cohort_root, cache_dir) -> input_pipeline.PairDataset:
  data = train.load_experiment_data(tiny_config(cohort_root))
  return input_pipeline.PairDataset(data.train, data.grid, cache_dir, data.normalizer)


def test_warm_cache_in_processes_gives_the_arrays_of_direct_loading(synthetic_cohort,
                                                                     tmp_path, monkeypatch):
  direct = _dataset(synthetic_cohort, tmp_path / 'direct')
  warmed = _dataset(synthetic_cohort, tmp_path / 'warmed')
  seen = []
  warmed.warm_cache(num_workers=2, progress=lambda done, total: seen.append((done, total)))
  subjects = warmed.pairs.subject.nunique()
  assert seen == [(k, subjects) for k in range(1, subjects + 1)]
  wanted = [direct.example(i) for i in range(len(direct))]
  # Everything is cached now: reading the pairs preprocesses nothing.
  calls = []
  monkeypatch.setattr(input_pipeline.PairDataset, '_preprocess',
                      lambda *args: calls.append(args))
  for i, want in enumerate(wanted):
    got = warmed.example(i)
    assert set(got) == set(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert calls == []
  assert not list((tmp_path / 'warmed').glob('*.tmp*'))  # No temporary files left.


def test_a_batch_is_a_function_of_seed_step_and_process_layout(synthetic_cohort, tmp_path):
  dataset = _dataset(synthetic_cohort, tmp_path / 'cache')
  batch = lambda step, **kw: input_pipeline.train_batch(
      dataset, step, global_batch=4, seed=3, intensity_jitter=0.1, flip_lr_prob=0.5, **kw)
  whole = batch(5)
  halves = [batch(5, process_index=p, process_count=2) for p in (0, 1)]
  for key in whole:
    np.testing.assert_array_equal(whole[key], np.concatenate([h[key] for h in halves]))
    np.testing.assert_array_equal(whole[key], batch(5)[key])
  assert not np.array_equal(whole['baseline'], batch(6)['baseline'])


def test_map_unordered_from_a_script_without_a_main_guard(tmp_path):
  """Spawned workers must not re-run the calling script (it would start pools itself)."""
  script = tmp_path / 'unguarded.py'
  script.write_text(textwrap.dedent('''
      import jax  # Threads are running: the pool must spawn, not fork.
      from progression import workers
      print(sorted(workers.map_unordered(abs, [-3, -1, -2], 2)))
  '''))
  result = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().splitlines() == ['[1, 2, 3]']


def test_map_unordered_runs_serially_for_one_worker():
  assert list(workers.map_unordered(abs, [-1, -2], 1)) == [1, 2]
  with pytest.raises(ValueError):
    list(workers.map_unordered(int, ['x'], 1))


def test_training_warns_once_per_baseline_whose_brain_leaves_the_grid(synthetic_cohort,
                                                                       tmp_path, caplog):
  config = tiny_config(synthetic_cohort, **{'grid.shape': (8, 8, 8)})  # 64 mm: too small
  data = train.load_experiment_data(config)
  dataset = input_pipeline.PairDataset(data.train, data.grid, tmp_path, data.normalizer)
  with caplog.at_level('WARNING'):
    dataset.example(0)
    dataset.example(0)  # cached: no second warning
  warned = [r.getMessage() for r in caplog.records if 'outside the model grid' in r.getMessage()]
  assert len(warned) == 1 and str(data.train.iloc[0]['baseline_image']) in warned[0]
  caplog.clear()
  fits = _dataset(synthetic_cohort, tmp_path / 'fits')  # 16^3 x 8 mm holds the brain
  with caplog.at_level('WARNING'):
    fits.example(0)
  assert not [r for r in caplog.records if 'outside the model grid' in r.getMessage()]
