"""Default configuration: every field of an experiment is declared and explained here once.

Variants (synthetic_small.py, demo.py) import this and change a few fields.
Units are in the names or comments: years, mm, voxels.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default experiment configuration."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameter init, data order and augmentation.

  # Which cohort to train on (see cohorts/*.toml) and how subjects are split.
  config.cohort = ml_collections.ConfigDict()
  config.cohort.spec = 'synthetic'  # Name in cohorts/ or a path to a .toml spec.
  config.cohort.root = ''  # Folder of the cohort on disk; required.
  config.cohort.split_fractions = (0.6, 0.2, 0.2)  # train/val/test, by subject.
  config.cohort.split_seed = 0  # Subject split is a function of this seed only.

  # The experiment grid every image is resampled onto (RAS+, centred on the brain).
  config.grid = ml_collections.ConfigDict()
  # 192 x 224 x 192 mm: an adult brain (~140 x 170 x 120 mm) with room for centring. Voxels,
  # each divisible by model.velocity_downsize * 2**(len(model.features) - 1) (2 * 4 = 8).
  config.grid.shape = (96, 112, 96)
  config.grid.voxel_size_mm = (2.0, 2.0, 2.0)

  # Generator: U-Net -> stationary velocity field (voxels/year) -> exp(years * v).
  config.model = ml_collections.ConfigDict()
  config.model.features = (16, 32, 64)  # Channels per U-Net level.
  config.model.velocity_downsize = 2  # Velocity grid = image grid / this (smooth anyway; 8x cheaper).
  config.model.num_squarings = 7  # Scaling-and-squaring steps of the exponential.
  config.model.max_velocity_voxels_per_year = 2.0  # tanh bound on |v| per component.
  config.model.intensity_residual = False  # Extra head for contrast change; off by default.
  config.model.conv_impl = 'auto'  # 'auto' | 'compiled' (fastest on CPU) | 'depth_taps' | 'native'.
  config.model.dtype = 'float32'  # Compute dtype; 'bfloat16' on GPU. Params stay float32.
  # Anchor on the regional progression model (label maps, else the tissue model): velocity =
  # a prior field realising its predicted regional rates + a zero-initialised residual
  # (progression.models.prior).
  config.model.prior = True
  config.model.prior_source = 'labels'  # Training sets it: 'tissue' for a cohort without labels.
  config.model.residual_scale = 0.05  # Voxels/year per unit of the residual head's output.
  # With label maps, also fit the regional model on the tissue model's volumes (brain, GM, WM,
  # CSF; ~1 s per training and validation visit at 2 mm): the prior of forecasts whose
  # baseline comes without a label map (progression.forecast_anchor).
  config.tissue_fallback = True

  # Loss weights (0 disables a term).
  config.loss = ml_collections.ConfigDict()
  config.loss.image = 1.0  # MSE between predicted and real follow-up (normalised intensities).
  config.loss.ncc = 0.0  # Local normalised cross-correlation (1 - NCC).
  config.loss.smoothness = 0.01  # Mean squared spatial gradient of the velocity field.
  config.loss.dice = 0.1  # Soft Dice of warped baseline labels vs follow-up labels.
  # Squared log ratio of predicted / real regional volumes (labels): supervises atrophy itself.
  # Demo, 500 steps: weight 0 leaves the model at no change; 10 cuts ventricle MAE 4x.
  config.loss.volume = 10.0
  config.loss.folding = 1.0  # Penalty on negative Jacobian determinants.

  # Optimiser: AdamW with linear warmup then cosine decay, global-norm clipping.
  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 50
  config.optim.weight_decay = 1e-4
  config.optim.grad_clip_norm = 1.0

  # Augmentation (training only, on the host, seeded per step and sample).
  config.augment = ml_collections.ConfigDict()
  config.augment.intensity_jitter = 0.05  # Std of a random gain/offset on both images.
  config.augment.flip_lr_prob = 0.5  # Left-right flip; label ids swapped left<->right.
  # Each covariate field is dropped (marked missing) with this probability, so the network and
  # the prior learn the missing-value indicators.
  config.augment.covariate_dropout = 0.1

  # Loop.
  config.per_device_batch_size = 1
  config.num_steps = 2000
  config.log_every_steps = 10
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 3
  config.prefetch_batches = 2  # Batches prepared ahead by a background thread.
  return config
