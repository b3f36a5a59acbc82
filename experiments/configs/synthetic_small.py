"""Small synthetic-cohort run: 32^3 at 4 mm, tiny U-Net; trains in seconds per 100 steps on CPU."""

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.grid.shape = (32, 32, 32)
  config.grid.voxel_size_mm = (4.0, 4.0, 4.0)
  config.model.features = (8, 16, 32)
  config.optim.warmup_steps = 10
  config.num_steps = 200
  config.eval_every_steps = 50
  config.checkpoint_every_steps = 50
  return config
