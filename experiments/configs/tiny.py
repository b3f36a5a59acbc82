"""Smoke-test size: 16^3 grid at 8 mm, 4-8 channels, 6 steps. Used by the test suite."""

from experiments.configs import synthetic_small


def get_config():
  config = synthetic_small.get_config()
  config.grid.shape = (16, 16, 16)
  config.grid.voxel_size_mm = (8.0, 8.0, 8.0)
  config.model.features = (4, 8)
  config.num_steps = 6
  config.log_every_steps = 1
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 2
  config.optim.warmup_steps = 1
  config.prefetch_batches = 0
  return config
