"""Forecaster: a baseline NIfTI + covariates + intervals in years -> predicted follow-ups.

One network evaluation gives the subject's stationary velocity field v (model-grid voxels
per year, on a grid `velocity_downsize` times coarser than the model grid); every horizon t
is then exp(t·v) by scaling and squaring, upsampled to the model grid, so a trajectory over
several horizons costs one forward pass and is consistent across horizons
(φ_{t1+t2} = φ_{t2}∘φ_{t1}); a region whose volume the flow shrinks at every point keeps
shrinking as t grows.

Conventions. The model's displacement u is a pull-back: follow-up(x) = baseline(x + u(x)).
Outputs (`Forecast`) are on the *input's* grid and affine, in the file's own voxel order:
  * `image`: the input baseline (its own intensities, full resolution) warped by u;
  * `displacement`: u in world mm (RAS+ components), `[x, y, z, 3]`; 0 outside the model grid;
  * `jacobian`: local volume ratio follow-up / baseline of the tissue at each *baseline*
    position (det of the push-forward exp(-t·v)); < 1 is shrinkage; 1 outside the model grid;
  * `labels`: the baseline label map warped through its linearly interpolated one-hot
    probabilities, each voxel's label drawn by a fixed dither (`forecast_fields.warp_input`),
    so label volumes follow the Jacobian-integrated ones; when given;
  * `volumes_ml`: predicted regional volumes (mL), the Jacobian integrated over the baseline
    label map (tensor-based morphometry) or, without labels, over a CSF/GM/WM segmentation
    of the baseline made by `evaluation.tissue`;
  * `intervals_ml`: region -> (lower, upper) prediction interval (mL, 90 % by default) around
    `volumes_ml`, from the regional model's split-conformal spread, when the checkpoint has
    one and the baseline is measured the way it was fitted (labels or tissue).
A generator anchored on the regional model (`config.model.prior`; `forecast_anchor`) builds
its prior field on the baseline label map when it was trained with label maps; given none, the
prior acts on the tissue model's brain, GM, WM and CSF with the regional model the checkpoint
fitted on tissue volumes, and a warning says so (a checkpoint without that model forecasts
with the network's residual alone, close to no change). A checkpoint trained on a cohort
without labels anchors on the tissue model.
The optional intensity-residual head of the generator is not applied: the forecast is the
deformation of the input image.
"""

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import nibabel as nib
import numpy as np
import pandas as pd
from absl import logging

from progression import checkpoints, covariates
from progression import forecast_anchor, forecast_fields, forecast_inputs, regional_model, train
from progression.errors import ProgressionError
# The input side of the API, kept importable from here (`forecast.Subject`, ...).
from progression.forecast_inputs import (MAX_YEARS, TISSUE_CLASSES, ImageLike, Subject,
                                         as_covariates, as_volume, check_years, like_input)
from progression.models import prior as prior_lib


@dataclasses.dataclass(frozen=True)
class Forecast:
  """One horizon of a subject's forecast, on the input's grid and affine (see module doc)."""
  years: float
  image: nib.Nifti1Image
  displacement: nib.Nifti1Image
  jacobian: nib.Nifti1Image
  labels: nib.Nifti1Image | None
  volumes_ml: dict[str, float]
  baseline_volumes_ml: dict[str, float]
  volume_method: str  # 'labels' (Jacobian over the label map) or 'tissue'.
  intervals_ml: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)


class Forecaster:
  """Forecasts follow-up MRIs with a trained generator on one device (CPU or GPU; no pmap)."""

  def __init__(self, config: ml_collections.ConfigDict, params: Any,
               normalizer: covariates.CovariateNormalizer,
               regional: regional_model.RegionalModel | None = None,
               training_missing: Mapping[str, float] | None = None,
               tissue_regional: regional_model.RegionalModel | None = None):
    """Args: `training_missing`: field -> share of training pairs missing it (checkpoint
    metadata); with no covariate dropout, a field never missing in training is warned about
    when a forecast leaves it out (None: not known, no warning). `tissue_regional`: a
    label-anchored checkpoint's regional model of tissue volumes (baselines without labels)."""
    self.config = config
    dropout = float(config.get('augment', {}).get('covariate_dropout', 0.0))
    self._never_missing = frozenset(f for f, share in (training_missing or {}).items()
                                    if share == 0 and dropout == 0)
    self._warned_missing: set[str] = set()
    self.grid = train.grid_from_config(config)
    self.normalizer = normalizer
    self.regional = regional
    self.tissue_regional = tissue_regional
    self._params = params
    self.downsize = int(config.model.velocity_downsize)
    self.anchored = bool(config.model.prior)
    self.prior_source = train.prior_source(config)
    self._anchor = forecast_anchor.RegionalAnchor(regional, self.prior_source, self.grid,
                                                  self.anchored, tissue_regional)
    model = train.create_model(config)
    self._residual_fn = jax.jit(lambda p, image, cov, rates: model.apply(
        {'params': p}, image, cov, rates if self.anchored else None,
        method=model.residual).astype(jnp.float32))
    self._prior_fn = jax.jit(
        lambda years, classes, rates, regions: prior_lib.prior_velocity(
            classes, rates, years, regions, self.downsize,
            num_squarings=int(config.model.num_squarings)), static_argnums=3)
    self._fields_fn = jax.jit(forecast_fields.fields_on_input, static_argnums=3)
    self._warp_fn = jax.jit(forecast_fields.warp_input)

  @classmethod
  def from_checkpoint(cls, path: str | Path, step: int | None = None) -> 'Forecaster':
    """Restores a Forecaster from a training workdir or its `checkpoints/` folder.

    The config, grid and covariate normaliser come from the checkpoint's metadata.

    Raises:
      ProgressionError: for a missing or damaged checkpoint, another format version, or
        metadata whose grid disagrees with its config.
    """
    path = Path(path)
    if not path.exists():
      raise ProgressionError(f'{path}: checkpoint not found')
    with _absl_errors_only():  # orbax logs every restore step and warns about read-only.
      checkpointer = checkpoints.Checkpointer(checkpoints.folder_of(path), read_only=True)
      try:
        metadata = checkpointer.restore_metadata(step)
        config, normalizer = _config_from_metadata(metadata, checkpointer.directory)
        template = jax.eval_shape(
            lambda: train.create_train_state(config, jax.random.PRNGKey(0)))
        state, _ = checkpointer.restore(_on_default_device(template), step)
      finally:
        checkpointer.close()
    regional = metadata.get('regional_model')
    params = state.params
    if not metadata.get('residual', {}).get('enabled', True):  # It did not beat the prior.
      params = train.zero_residual(params)
    as_model = lambda d: None if d is None else regional_model.RegionalModel.from_dict(d)
    return cls(config, params, normalizer, as_model(regional), metadata.get('training_missing'),
               as_model(metadata.get('tissue_regional_model')))

  def prepare(self, baseline: ImageLike, labels: ImageLike | None = None) -> Subject:
    """Loads and checks a baseline (and its labels on the same grid); puts it on the model grid.

    Warns once (naming the file) when the brain reaches beyond the model grid: the label
    map's brain (labels > 0 but extracerebral CSF), else the tissue model's GM and WM.
    """
    return forecast_inputs.prepare(baseline, labels, self.grid)

  @property
  def velocity_shape(self) -> tuple[int, int, int, int]:
    """Shape of a velocity field: the model grid / `downsize`, then 3 components."""
    return (*(s // self.downsize for s in self.grid.shape), 3)

  def velocity(self, subject: Subject, cov: 'covariates.Covariates | Mapping[str, Any]',
               years: float = 1.0) -> np.ndarray:
    """The subject's velocity `velocity_shape` (model-grid voxels / year, coarse grid).

    With an anchored generator the prior part is solved for the horizon `years` (years).
    """
    return self._velocity(subject, as_covariates(cov), years)

  def _velocity(self, subject: Subject, cov: covariates.Covariates, years: float,
                rate_correction: np.ndarray | None = None, prior_only: bool = False
                ) -> np.ndarray:
    """`velocity`, with `rate_correction` (1/year) added to the prior's rates; `prior_only`:
    the prior field alone (the residual zeroed), without running the network.

    The network sees the prior's rates, or zeros when the prior acts on other regions than
    training's (the tissue-model fallback of a label-anchored checkpoint).
    """
    inputs = self._anchor.inputs(subject, cov)
    rates = inputs.rates
    if rate_correction is not None:
      rates = (rates + rate_correction).astype(np.float32)
    prior = np.zeros(self.velocity_shape, np.float32)
    if self.anchored:
      prior = np.asarray(self._prior_fn(
          jnp.float32([years]), jnp.asarray(inputs.classes)[None], jnp.asarray(rates)[None],
          prior_lib.prior_regions(inputs.source))[0])
    if prior_only:
      return prior
    if inputs.source != self.prior_source:
      rates = np.zeros(len(prior_lib.prior_regions(self.prior_source).rate_regions), np.float32)
    image = jnp.asarray(subject.gridded.image)[None, ..., None]
    encoded = jnp.asarray(covariates.encode(cov, self.normalizer))[None]
    residual = self._residual_fn(self._params, image, encoded, jnp.asarray(rates)[None])
    return np.asarray(residual[0]) + prior

  def trajectory(self, subject: Subject, velocity: np.ndarray,
                 years: Sequence[float]) -> list[Forecast]:
    """Forecasts of `subject` at each interval in `years` from one given velocity field."""
    velocity = np.asarray(velocity, dtype=np.float32)
    if velocity.shape != self.velocity_shape:
      raise ProgressionError(f'velocity: expected shape {self.velocity_shape}, '
                             f'got {velocity.shape}')
    baseline_ml = subject.baseline_volumes_ml()
    return [self._horizon(subject, velocity, t, baseline_ml) for t in check_years(years)]

  def _forecasts(self, subject: Subject, cov: covariates.Covariates,
                 years: Sequence[float]) -> list[Forecast]:
    """One forecast per horizon; an anchored generator's prior is solved per horizon."""
    self._warn_untrained_missing(cov)
    baseline_ml = subject.baseline_volumes_ml()
    out = []
    for t in check_years(years):
      correction = None
      if self._anchor.corrects(subject, t):
        prior_only_ml = lambda c, t=t: self._volumes_at(
            subject, self._velocity(subject, cov, t, c, prior_only=True), t)
        correction = self._anchor.rate_correction(self._anchor.inputs(subject, cov), t,
                                                  baseline_ml, prior_only_ml)
      velocity = self._velocity(subject, cov, max(t, 1e-3), correction)
      forecast = self._horizon(subject, velocity, t, baseline_ml)
      out.append(dataclasses.replace(forecast, intervals_ml=self._anchor.intervals(
          subject, t, forecast.volumes_ml)))
    return out

  def _warn_untrained_missing(self, cov: covariates.Covariates) -> None:
    """Warns once per field left out here that no training pair ever lacked."""
    fields = sorted(f for f in self._never_missing - self._warned_missing
                    if getattr(cov, f) is None)
    if fields:
      logging.warning('forecast covariates lack %s, which every training pair had (and training '
                      'used no covariate dropout): the network never learned this field '
                      'missing; its forecast may be off. Give the field, or train with '
                      'augment.covariate_dropout > 0', ', '.join(fields))
      self._warned_missing.update(fields)

  def forecast(self, baseline: ImageLike, cov: 'covariates.Covariates | Mapping[str, Any]',
               years: Sequence[float], labels: ImageLike | None = None) -> list[Forecast]:
    """Forecasts `baseline` at each interval in `years` (0 <= t <= MAX_YEARS, in years).

    Args:
      baseline: a 3D T1w image: path, nibabel image or `io.Volume`, any orientation.
      cov: `Covariates` or a mapping of raw values (validated by `parse_covariates`).
      years: intervals from the baseline, in years.
      labels: optional baseline label map (FreeSurfer ids) on the baseline's grid; needed by
        a generator anchored on the regional model.

    Returns:
      One `Forecast` per interval, in the order given.
    """
    cov = as_covariates(cov)
    years = check_years(years)
    return self._forecasts(self.prepare(baseline, labels), cov, years)

  def counterfactuals(self, baseline: ImageLike,
                      cov: 'covariates.Covariates | Mapping[str, Any]',
                      scenarios: Mapping[str, Mapping[str, Any]], years: Sequence[float],
                      labels: ImageLike | None = None) -> dict[str, list[Forecast]]:
    """Forecasts the same baseline under changed covariates, one trajectory per scenario.

    `scenarios` maps a name to the fields to change, e.g.
    `{'CN': {'diagnosis': 'CN'}, 'AD': {'diagnosis': 'AD', 'apoe4': 2}}`; `{}` keeps `cov`.
    The baseline is prepared once.
    """
    base = covariates.covariates_to_dict(as_covariates(cov))
    changed = {name: covariates.parse_covariates({**base, **changes},
                                                 where=f'counterfactual scenario {name!r}')
               for name, changes in scenarios.items()}
    years = check_years(years)
    subject = self.prepare(baseline, labels)
    return {name: self._forecasts(subject, c, years) for name, c in changed.items()}

  def _sampled_fields(self, subject: Subject, velocity: np.ndarray, years: float) -> jax.Array:
    """`forecast_fields.fields_on_input` of a horizon: `[4, X, Y, Z]` on the input's voxels."""
    to_grid = np.linalg.solve(subject.gridded.affine, subject.image.affine)[:3]
    return self._fields_fn(
        jnp.asarray(velocity), jnp.float32(years), jnp.asarray(to_grid, jnp.float32),
        (int(self.config.model.num_squarings), self.downsize, subject.image.data.shape))

  def _volumes_at(self, subject: Subject, velocity: np.ndarray, years: float
                  ) -> dict[str, float]:
    """A horizon's Jacobian-integrated regional volumes (mL), without warping the images."""
    jacobian = 1.0 + np.asarray(self._sampled_fields(subject, velocity, years)[3])
    return subject.forecast_volumes_ml(jacobian)

  def _horizon(self, subject: Subject, velocity: np.ndarray, years: float,
               baseline_ml: dict[str, float]) -> Forecast:
    image = subject.image
    grid_affine = subject.gridded.affine
    grid_to_input = np.linalg.solve(image.affine[:3, :3], grid_affine[:3, :3])
    label_map = None if subject.labels is None else jnp.asarray(subject.labels.data)
    sampled = self._sampled_fields(subject, velocity, years)
    predicted, displacement_mm, jacobian, warped_labels = (
        None if x is None else np.asarray(x) for x in self._warp_fn(
            sampled, jnp.asarray(image.data, jnp.float32), label_map,
            jnp.asarray(grid_to_input, jnp.float32), jnp.asarray(grid_affine[:3, :3], jnp.float32)))
    return Forecast(
        years=float(years),
        image=like_input(predicted, image),
        displacement=like_input(displacement_mm, image),
        jacobian=like_input(jacobian, image),
        labels=None if warped_labels is None else like_input(warped_labels.astype(np.int16),
                                                             image),
        volumes_ml=subject.forecast_volumes_ml(jacobian),
        baseline_volumes_ml=dict(baseline_ml),
        volume_method=subject.volume_method)


def volumes_table(forecasts: 'Sequence[Forecast] | Mapping[str, Sequence[Forecast]]'
                  ) -> pd.DataFrame:
  """Long table of predicted volumes: one row per (scenario,) horizon and region.

  Columns: [scenario,] years, region, volume_ml, lower_ml and upper_ml (prediction interval,
  NaN without one), baseline_volume_ml, change_pct (total % change from the baseline),
  method. `scenario` only when given a mapping (counterfactuals).
  """
  if isinstance(forecasts, Mapping):
    tables = [volumes_table(f).assign(scenario=name) for name, f in forecasts.items()]
    table = pd.concat(tables, ignore_index=True)
    return table[['scenario'] + [c for c in table.columns if c != 'scenario']]
  nan = (float('nan'), float('nan'))
  rows = [{'years': f.years, 'region': region, 'volume_ml': ml,
           'lower_ml': f.intervals_ml.get(region, nan)[0],
           'upper_ml': f.intervals_ml.get(region, nan)[1],
           'baseline_volume_ml': f.baseline_volumes_ml[region],
           'change_pct': (100.0 * (ml / f.baseline_volumes_ml[region] - 1.0)
                          if f.baseline_volumes_ml[region] > 0 else float('nan')),
           'method': f.volume_method}
          for f in forecasts for region, ml in f.volumes_ml.items()]
  return pd.DataFrame(rows, columns=['years', 'region', 'volume_ml', 'lower_ml', 'upper_ml',
                                     'baseline_volume_ml', 'change_pct', 'method'])


def _config_from_metadata(metadata: Mapping[str, Any], where: Path
                          ) -> tuple[ml_collections.ConfigDict, covariates.CovariateNormalizer]:
  """The experiment config and normaliser recorded in a checkpoint, checked for consistency."""
  missing = [k for k in ('config', 'grid', 'normalizer') if k not in metadata]
  if missing:
    raise ProgressionError(f'{where}: checkpoint metadata lacks {missing}; not a progression '
                           'training checkpoint?')
  config = ml_collections.ConfigDict(metadata['config'])
  try:
    train.create_model(config)
    train.grid_from_config(config)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise ProgressionError(f'{where}: checkpoint config does not describe a model this version '
                           f'of progression can build ({type(e).__name__}: {e})') from None
  saved = metadata['grid']
  if (list(saved.get('shape', [])) != list(config.grid.shape)
      or not np.allclose(saved.get('voxel_size_mm', [0, 0, 0]), config.grid.voxel_size_mm)):
    raise ProgressionError(f'{where}: checkpoint grid {saved} disagrees with its config grid '
                           f'{config.grid.to_dict()}; the checkpoint is inconsistent')
  factor = int(config.model.velocity_downsize) * 2 ** (len(config.model.features) - 1)
  if any(int(s) % factor for s in config.grid.shape):
    raise ProgressionError(f'{where}: checkpoint grid {list(config.grid.shape)} is not divisible '
                           f'by {factor} as its model needs (velocity_downsize x 2^(levels-1))')
  return config, covariates.CovariateNormalizer.from_dict(metadata['normalizer'])


@contextlib.contextmanager
def _absl_errors_only():
  previous = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(previous)


def _on_default_device(template: Any) -> Any:
  """Abstract arrays placed on the default device, so orbax restores without pmap or mesh."""
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), template)
