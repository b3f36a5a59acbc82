"""The README demo: a few minutes of training on 2 CPU cores at 32^3 (4 mm voxels).

The demo cohort is 64^3 at 2 mm; the model sees it resampled to 4 mm, and forecasts are
warped back to the full 2 mm grid, where volumes are integrated.
"""

from experiments.configs import synthetic_small


def get_config():
  config = synthetic_small.get_config()
  config.model.features = (8, 16, 32)
  config.num_steps = 500
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 100
  return config
