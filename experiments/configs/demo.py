"""The README demo: a few minutes of training on 2 CPU cores at 48^3 (4 mm voxels).

The demo cohort is 64^3 at 3 mm (192 mm: heads at ~0.9 x adult size); the model sees it
resampled to 4 mm, and forecasts are warped back to the full 3 mm grid, where volumes are
integrated. The generator is anchored on the regional model (the default), so it starts at
the regional model's forecasts and training adds the residual.
"""

from experiments.configs import synthetic_small


def get_config():
  config = synthetic_small.get_config()
  config.grid.shape = (48, 48, 48)
  config.grid.voxel_size_mm = (4.0, 4.0, 4.0)
  config.model.features = (8, 16, 32)
  config.num_steps = 300
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 100
  return config
