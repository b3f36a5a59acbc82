"""The progression generator: baseline MRI + covariates -> velocity -> forecast at any interval.

A conditioning MLP embeds the encoded covariates; a FiLM-conditioned U-Net on
the baseline predicts a STATIONARY velocity field v (voxels of the model grid
per year) that does not depend on the interval, so phi_t = exp(t v) gives every
horizon from one network evaluation and phi_{t1+t2} = phi_{t2} o phi_{t1}. The
forecast is the baseline warped by phi_t (scaling and squaring), optionally plus
an intensity residual rate times t (off by default).

Resolution: with `downsize` f (default 2) the baseline is folded losslessly into
channels (space-to-depth, 2x2x2 voxels -> 8 channels), the U-Net runs and the
velocity lives on the f-times coarser grid, the flow is integrated there and the
displacement upsampled trilinearly to the model grid (VoxelMorph's int_downsize;
8x cheaper convs and integration). f = 1 runs everything at full resolution.

Room for later: a CVAE latent would enter through the conditioning vector with
an rng passed to `__call__`; nothing here assumes the velocity is deterministic.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from progression.errors import ProgressionError
from progression.models import layers
from progression.models import prior as prior_lib
from progression.models import unet as unet_lib
from progression.models import warp as warp_lib

Array = jax.Array
Dtype = Any


def forecast_from_velocity(baseline: Array, velocity: Array, years: Array,
                           num_squarings: int = 7,
                           intensity_rate: Optional[Array] = None) -> dict[str, Array]:
  """Forecast at `years` from a velocity field (the one code path of the generator).

  Args:
    baseline: [B, X, Y, Z, C] baseline image(s) on the model grid.
    velocity: [B, X/f, Y/f, Z/f, 3] in voxels OF THE MODEL GRID per year, on a
      grid f >= 1 times coarser than the baseline (f inferred from the shapes).
    years: [B] interval in years (0 -> prediction == baseline exactly).
    num_squarings: scaling-and-squaring steps.
    intensity_rate: optional [B, X, Y, Z, C] intensity change per year in
      baseline space; warped with the baseline and added times `years`.
  Returns:
    dict with 'velocity' (as given), 'displacement' [B,X,Y,Z,3] voxels,
    'prediction' [B,X,Y,Z,C] float32, 'jacobian' [B,X,Y,Z] (det of d phi / dx).
  """
  if baseline.ndim != 5 or velocity.ndim != 5 or velocity.shape[-1] != 3:
    raise ProgressionError(
        f'baseline must be [B,x,y,z,C] and velocity [B,x,y,z,3]; got {baseline.shape}, '
        f'{velocity.shape}')
  factors = {b // v for b, v in zip(baseline.shape[1:4], velocity.shape[1:4])}
  factor = factors.pop()
  if factors or factor < 1 or any(
      b != factor * v for b, v in zip(baseline.shape[1:4], velocity.shape[1:4])):
    raise ProgressionError(
        f'baseline grid {baseline.shape[1:4]} must be one integer multiple of the velocity grid '
        f'{velocity.shape[1:4]}')
  if baseline.shape[0] != velocity.shape[0]:
    raise ProgressionError(f'batch mismatch: baseline {baseline.shape}, velocity {velocity.shape}')
  years = jnp.asarray(years, jnp.float32)
  image = baseline
  if intensity_rate is not None:
    image = jnp.concatenate([baseline.astype(jnp.float32), intensity_rate.astype(jnp.float32)], -1)
  displacement, warped, jacobian = warp_lib.flow(image, velocity, years, num_squarings,
                                                 upsample_factor=factor)
  prediction = warped
  if intensity_rate is not None:
    c = baseline.shape[-1]
    prediction = warped[..., :c] + years[:, None, None, None, None] * warped[..., c:]
  return {
      'velocity': velocity,
      'displacement': displacement,
      'prediction': prediction,
      'jacobian': jacobian,
  }


class ProgressionGenerator(nn.Module):
  """Covariate-conditioned diffeomorphic forecaster (see module docstring).

  Attributes:
    features: U-Net channels per level, e.g. (16, 32, 64).
    cond_dim: width of the encoded covariate vector (covariates.ENCODED_DIM).
    num_squarings: scaling-and-squaring steps.
    intensity_residual: add a learned intensity change rate (per year).
    dtype: compute dtype of convs/dense (e.g. jnp.bfloat16 on GPU); params,
      norms, the velocity and all warping stay float32.
    downsize: velocity grid factor f (1 = full resolution); the grid must be
      divisible by f * 2^(len(features)-1).
    cond_features: width of the conditioning embedding.
    max_velocity_voxels_per_year: optional tanh bound on |v| per component.
    velocity_init_scale: stddev of the velocity head's initial kernel (small, so
      training starts near the identity map).
    conv_impl: `layers.Conv3D` impl ('auto' | 'compiled' | 'depth_taps' | 'native').
    unet_skip: 'concat' | 'add' decoder skips (see `unet.UNet`).
    prior_regions: when set, the velocity is `prior.prior_velocity` (the regional model's
      predicted rates realised on the baseline label map) plus the network's residual, the
      residual head starts at zero and the network also sees the predicted rates; so an
      untrained generator forecasts the regional model's volumes.
    residual_scale: voxels/year per unit of the residual head's output (with a prior), so
      Adam steps move the residual at the scale of real atrophy (0.005-0.07 voxel/year).
  """
  features: Sequence[int]
  cond_dim: int
  num_squarings: int = 7
  intensity_residual: bool = False
  dtype: Optional[Dtype] = None
  downsize: int = 2
  cond_features: int = 64
  max_velocity_voxels_per_year: Optional[float] = None
  velocity_init_scale: float = 1e-5
  conv_impl: str = 'auto'
  unet_skip: str = 'concat'
  prior_regions: Optional[prior_lib.PriorRegions] = None
  residual_scale: float = 0.05

  def setup(self):
    self.cond_in = nn.Dense(self.cond_features, name='cond_in')
    self.cond_out = nn.Dense(self.cond_features, name='cond_out')
    self.unet = unet_lib.UNet(tuple(self.features), conv_impl=self.conv_impl, dtype=self.dtype,
                              skip=self.unet_skip, name='unet')
    head_init = (nn.initializers.zeros_init() if self.prior_regions is not None
                 else nn.initializers.normal(self.velocity_init_scale))
    self.velocity_head = layers.Conv3D(3, impl=self.conv_impl, dtype=jnp.float32,
                                       kernel_init=head_init, name='velocity_head')
    if self.intensity_residual:
      self.intensity_head = layers.Conv3D(
          self.downsize ** 3, impl=self.conv_impl, dtype=jnp.float32,
          kernel_init=nn.initializers.zeros_init(), name='intensity_head')

  def _check(self, baseline: Array, covariates: Array) -> None:
    if baseline.ndim != 5:
      raise ProgressionError(f'baseline must be [batch, x, y, z, 1], got {baseline.shape}')
    if covariates.shape != (baseline.shape[0], self.cond_dim):
      raise ProgressionError(
          f'covariates must be [batch, cond_dim]={(baseline.shape[0], self.cond_dim)}, got '
          f'{covariates.shape}')
    div = self.downsize * 2 ** (len(self.features) - 1)
    if any(n % div for n in baseline.shape[1:4]):
      raise ProgressionError(
          f'grid {tuple(baseline.shape[1:4])} must be divisible by {div} (downsize '
          f'{self.downsize} x 2^(levels-1) for features {tuple(self.features)}); pad or crop')

  def _trunk(self, baseline: Array, covariates: Array, prior_log_rates: Optional[Array]
             ) -> Array:
    """U-Net features on the velocity grid: [B, X/f, Y/f, Z/f, features[0]] float32."""
    self._check(baseline, covariates)
    cond = covariates.astype(jnp.float32)
    if self.prior_regions is not None and prior_log_rates is None:
      raise ProgressionError('this generator is anchored on a regional prior: give '
                             'prior_classes [B,X,Y,Z] and prior_log_rates [B,K]')
    if self.prior_regions is not None:  # Rates as ~unit inputs (log change 0.01-0.1 / year).
      rates = jnp.nan_to_num(prior_log_rates.astype(jnp.float32))  # NaN: rate not predicted.
      cond = jnp.concatenate([cond, 10.0 * rates], axis=-1)
    cond = nn.silu(self.cond_out(nn.silu(self.cond_in(cond))))
    x = layers.space_to_depth(baseline.astype(jnp.float32), self.downsize)
    return self.unet(x, cond).astype(jnp.float32)

  def _velocity_head(self, h: Array) -> Array:
    v = self.velocity_head(h)
    if self.prior_regions is not None:
      v = self.residual_scale * v
    if self.max_velocity_voxels_per_year is not None:
      m = self.max_velocity_voxels_per_year
      v = m * jnp.tanh(v / m)
    return v

  def prior(self, baseline: Array, years: Array, prior_classes: Optional[Array],
            prior_log_rates: Optional[Array]) -> Optional[Array]:
    """The prior part of `velocity` [B, X/f, Y/f, Z/f, 3] (None unanchored; no parameters:
    what `velocity` gives with the residual head zeroed, without running the network)."""
    if self.prior_regions is None:
      return None
    if prior_classes is None or prior_log_rates is None:
      raise ProgressionError('this generator is anchored on a regional prior: give '
                             'prior_classes [B,X,Y,Z] and prior_log_rates [B,K]')
    return prior_lib.prior_velocity(prior_classes, prior_log_rates, years,
                                    self.prior_regions, self.downsize,
                                    num_squarings=self.num_squarings)

  def residual(self, baseline: Array, covariates: Array,
               prior_log_rates: Optional[Array] = None) -> Array:
    """The network's part of `velocity` [B, X/f, Y/f, Z/f, 3] (voxels/year): all of it
    unanchored; with a prior, the residual added to the prior field (the network sees the
    rates `prior_log_rates` [B, K])."""
    return self._velocity_head(self._trunk(baseline, covariates, prior_log_rates))

  def velocity(self, baseline: Array, covariates: Array, years: Optional[Array] = None,
               prior_classes: Optional[Array] = None,
               prior_log_rates: Optional[Array] = None) -> Array:
    """Velocity [B, X/f, Y/f, Z/f, 3] in model-grid voxels per year: `residual` + `prior`.

    Args: baseline [B, X, Y, Z, 1]; covariates [B, cond_dim] (encoded); with a prior also
    years [B] (the horizon the prior is solved for), prior_classes [B, X, Y, Z] and
    prior_log_rates [B, K].
    """
    residual = self.residual(baseline, covariates, prior_log_rates)
    prior = self.prior(baseline, years if years is None else jnp.asarray(years, jnp.float32),
                        prior_classes, prior_log_rates)
    return residual if prior is None else residual + prior

  def __call__(self, baseline: Array, years: Array, covariates: Array,
               train: bool = False, prior_classes: Optional[Array] = None,
               prior_log_rates: Optional[Array] = None) -> dict[str, Array]:
    """Forecast: baseline [B,X,Y,Z,1], years [B], covariates [B,cond_dim] -> dict.

    Keys: 'velocity' [B,X/f,Y/f,Z/f,3] (voxels/year), 'displacement' [B,X,Y,Z,3]
    (voxels), 'prediction' [B,X,Y,Z,1], 'jacobian' [B,X,Y,Z]; plus
    'intensity_rate' [B,X,Y,Z,1] (per year) when intensity_residual. With a prior,
    prior_classes and prior_log_rates are required (see `velocity`). `train` is
    unused today (no dropout/batch statistics) and kept for a stable API.
    """
    del train
    years = jnp.asarray(years, jnp.float32)
    if years.shape != baseline.shape[:1]:
      raise ProgressionError(f'years must be [batch]={baseline.shape[:1]}, got {years.shape}')
    h = self._trunk(baseline, covariates, prior_log_rates)
    rate = None
    if self.intensity_residual:
      rate = layers.depth_to_space(self.intensity_head(h), self.downsize)
    velocity = self._velocity_head(h)
    prior = self.prior(baseline, years, prior_classes, prior_log_rates)
    if prior is not None:
      velocity = velocity + prior
    out = forecast_from_velocity(baseline, velocity, years, self.num_squarings,
                                 intensity_rate=rate)
    if rate is not None:
      out['intensity_rate'] = rate
    return out
