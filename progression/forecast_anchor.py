"""The Forecaster's link to the regional model: prior inputs, input-grid correction, intervals.

An anchored generator's velocity is a prior field realising the regional model's rates
(`models/prior.py`) plus a learned residual. For one baseline, `RegionalAnchor` gives the
prior's inputs (model-grid class map, annual log rates), the correction that makes the
prior's regional change exact on the input's own grid, and the conformal intervals around a
forecast's volumes. A checkpoint anchored on label maps needs the baseline's label map; one
trained on a cohort without labels anchors on the tissue model (any baseline).
"""

from typing import TYPE_CHECKING, Callable, Mapping

import numpy as np
from absl import logging

from progression import covariates, labels as labels_lib, preprocess, regional_model
from progression.evaluation import baselines, tissue, volumes
from progression.models import prior as prior_lib

if TYPE_CHECKING:
  from progression.forecast import Subject

RATE_CORRECTION_STEPS = 3  # Newton steps matching the prior's regional change on the input.


class RegionalAnchor:
  """Prior inputs and intervals of one checkpoint's regional model on a model grid."""

  def __init__(self, regional: regional_model.RegionalModel | None, prior_source: str,
               grid: preprocess.Grid, anchored: bool):
    self.regional = regional
    self.prior_source = prior_source
    self.rate_regions = prior_lib.prior_regions(prior_source).rate_regions
    self.grid = grid
    self.anchored = anchored
    self._last = None  # (subject, covariates, inputs): each horizon asks 3-4 times.

  def inputs(self, subject: 'Subject', cov: covariates.Covariates
             ) -> tuple[np.ndarray, np.ndarray]:
    """Model-grid classes `[X, Y, Z]` and annual log rates `[K]` (1/year) for the prior.

    Zero rates (no prior) when the generator is not anchored, and with a warning when the
    baseline lacks what the checkpoint's prior needs; NaN for a region not predicted.
    """
    if self._last is not None and self._last[0] is subject and self._last[1] == cov:
      return self._last[2]
    inputs = self._solve_inputs(subject, cov)
    self._last = (subject, cov, inputs)
    return inputs

  def _solve_inputs(self, subject: 'Subject', cov: covariates.Covariates
                    ) -> tuple[np.ndarray, np.ndarray]:
    classes = np.zeros(self.grid.shape, np.uint8)
    rates = np.zeros(len(self.rate_regions), np.float32)
    if not self.anchored:
      return classes, rates
    if self.regional is None or (self.prior_source == 'labels' and subject.labels is None):
      logging.warning('forecast without a baseline label map (or a checkpoint without a regional '
                      'model): the regional prior is off and the forecast is the network\'s '
                      'residual alone; give --labels for anchored forecasts')
      return classes, rates
    if self.prior_source == 'labels':
      classes = labels_lib.ids_to_classes(subject.gridded.labels)
      baseline_ml = subject.baseline_volumes_ml()
    else:
      classes, baseline_ml = self._tissue_inputs(subject)
    predicted = self.regional.log_rates(cov, baseline_ml)
    return classes, np.asarray([predicted.get(r, np.nan) for r in self.rate_regions],
                               np.float32)

  def _tissue_inputs(self, subject: 'Subject') -> tuple[np.ndarray, dict[str, float]]:
    """Tissue classes on the model grid and tissue volumes (mL) of the baseline."""
    seg = (subject.region_map if subject.volume_method == 'tissue'
           else tissue.segment_tissue(subject.image.data))
    classes = preprocess.resample(seg, subject.image.affine, self.grid.shape,
                                  subject.gridded.affine, order=preprocess.NEAREST)
    return classes.astype(np.uint8), volumes.regional_volumes_ml(
        seg, subject.image.voxel_volume_ml, regions=baselines.TISSUE_REGIONS)

  def corrects(self, subject: 'Subject', years: float) -> bool:
    """Whether `rate_correction` applies: anchored, on the prior's own kind of volumes."""
    return (self.anchored and self.regional is not None and years >= 0.1
            and subject.volume_method == self.prior_source)

  def rate_correction(self, rates: np.ndarray, years: float, baseline_ml: Mapping[str, float],
                      prior_only_ml: Callable[[np.ndarray], Mapping[str, float]]) -> np.ndarray:
    """What the prior misses on the input grid at `years`: target - realised log rates.

    The prior is exact on the model grid; measured on the input's own labels (another
    resolution, trilinearly sampled Jacobian) it realises a few % less of the change (1 % at
    2 mm on a 2 mm input, 5-8 % at 4 mm on a 3 mm input). `RATE_CORRECTION_STEPS` Newton
    steps, each forecasting with the prior alone (`prior_only_ml(correction)`: the volumes
    (mL) with the rates shifted by `correction`), make the anchored forecast's regional
    volumes the regional model's on the input grid too (within ~0.5 % of the change at
    4 mm; a few % for a structure of one or two model voxels on the 8 mm test grids).
    """
    correction = np.zeros_like(rates)
    for _ in range(RATE_CORRECTION_STEPS):
      realised_ml = prior_only_ml(correction)
      realised = np.array([np.log(max(realised_ml[r], 1e-9) / baseline_ml[r]) / years
                           if baseline_ml.get(r, 0) > 0 else rates[k]
                           for k, r in enumerate(self.rate_regions)])
      correction = np.where(np.isfinite(rates), correction + rates - realised, 0.0).astype(
          np.float32)  # A region without a predicted rate (NaN) stays unconstrained.
    return correction

  def intervals(self, subject: 'Subject', years: float, predicted_ml: Mapping[str, float]
                ) -> dict[str, tuple[float, float]]:
    """Conformal (lower, upper) mL around the predicted volumes (regional model's spread)."""
    if self.regional is None or subject.volume_method != self.regional.volume_method:
      return {}
    out = {}
    for region in self.regional.regions:
      if region in predicted_ml:
        half = self.regional.conformal_q[region] * self.regional.spread(region, years)
        out[region] = (predicted_ml[region] * float(np.exp(-half)),
                       predicted_ml[region] * float(np.exp(half)))
    return out
