"""The README demo: a few minutes of training on 2 CPU cores at 32^3 (4 mm voxels)."""

from experiments.configs import synthetic_small


def get_config():
  config = synthetic_small.get_config()
  config.model.features = (8, 16, 32)
  config.num_steps = 400
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 100
  return config
