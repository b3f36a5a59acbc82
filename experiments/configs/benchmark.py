"""Benchmark configuration (`python -m experiments.benchmark`): the default experiment.

The benchmark times the real training code (`train.create_train_state`, `steps.train_step`,
`parallel.pmap_train_step`) and `forecast.Forecaster` with this config. `grid.shape` is
replaced by each `--sizes` entry for the generator measurements; as given here it is the
model grid of the forecast and input-pipeline measurements (the default experiment's grid,
96 x 112 x 96 voxels at 2 mm).
"""

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.per_device_batch_size = 1  # Samples per device per step; per-sample times divide by it.
  config.prefetch_batches = 0  # The pipeline is timed on its own, without the prefetch thread.
  return config
