"""The standard experiment: 2 mm on a brain-covering 96 x 112 x 96 grid (192 x 224 x 192 mm).

For the 200-subject synthetic cohort of `python -m experiments.make_cohort --subjects 200
--shape 96,112,96 --voxel_mm 2 --visits 3 --seed 0` (adult heads at real size). The generator
is anchored on the regional model (`model.prior`), so its forecasts start at the regional
model's volumes; the steps a CPU run affords are few (RESULTS.md states them).
"""

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.grid.shape = (96, 112, 96)
  config.grid.voxel_size_mm = (2.0, 2.0, 2.0)
  config.model.features = (8, 16, 32)
  config.optim.warmup_steps = 20
  config.num_steps = 300
  config.log_every_steps = 10
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 50
  return config
