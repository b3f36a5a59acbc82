"""The Forecaster's link to the regional model: prior inputs, input-grid correction, intervals.

An anchored generator's velocity is a prior field realising the regional model's rates
(`models/prior.py`) plus a learned residual. For one baseline, `RegionalAnchor` gives the
prior's inputs (which prior regions, model-grid class map, annual log rates), the correction
that makes the prior's regional change exact on the input's own grid, and the conformal
intervals around a forecast's volumes. A checkpoint anchored on label maps uses the baseline's
label map; given none, it falls back to the tissue model's regions (brain, GM, WM, CSF) with
the regional model it fitted on tissue volumes at training (`tissue_regional`; a warning says
so; checkpoints without one forecast without a prior). One trained on a cohort without labels
anchors on the tissue model (any baseline).
"""

import dataclasses
from typing import TYPE_CHECKING, Callable, Mapping

import numpy as np
from absl import logging

from progression import covariates, labels as labels_lib, preprocess, regional_model
from progression.evaluation import baselines, tissue, volumes
from progression.models import prior as prior_lib

if TYPE_CHECKING:
  from progression.forecast_inputs import Subject

RATE_CORRECTION_STEPS = 3  # Newton steps matching the prior's regional change on the input.


@dataclasses.dataclass(frozen=True)
class PriorInputs:
  """What the prior field of one baseline is built from.

  Attributes:
    source: the prior regions `classes` index ('labels' or 'tissue': `prior.prior_regions`).
    classes: `[X, Y, Z]` class indices on the model grid.
    rates: `[K]` annual log rates (1/year) of `source`'s rate regions; 0 without a prior,
      NaN for a region not predicted.
  """
  source: str
  classes: np.ndarray
  rates: np.ndarray


class RegionalAnchor:
  """Prior inputs and intervals of one checkpoint's regional model(s) on a model grid.

  Args:
    regional: the regional model fitted on the checkpoint's `prior_source` volumes.
    prior_source: 'labels' or 'tissue' (what training anchored on).
    grid: the model grid.
    anchored: whether the generator has a prior at all.
    tissue_regional: for a 'labels' checkpoint, its regional model of the tissue model's
      volumes: the prior of a baseline given without a label map.
  """

  def __init__(self, regional: regional_model.RegionalModel | None, prior_source: str,
               grid: preprocess.Grid, anchored: bool,
               tissue_regional: regional_model.RegionalModel | None = None):
    self.regional = regional
    self.tissue_regional = tissue_regional
    self.prior_source = prior_source
    self.grid = grid
    self.anchored = anchored
    self._last = None  # (subject, covariates, inputs): each horizon asks 3-4 times.
    self._warned: set[str] = set()  # Each warning once per Forecaster (an evaluation: 100s).

  def model_for(self, subject: 'Subject') -> tuple[str, regional_model.RegionalModel | None]:
    """The prior source and regional model that anchor `subject` (None: no prior)."""
    if not self.anchored:
      return self.prior_source, None
    if self.prior_source == 'labels' and subject.labels is None:
      return 'tissue', self.tissue_regional
    return self.prior_source, self.regional

  def inputs(self, subject: 'Subject', cov: covariates.Covariates) -> PriorInputs:
    """The prior's inputs for `subject`: zero rates (no prior) when the generator is not
    anchored, and with a warning when the checkpoint has no regional model for the baseline.
    """
    if self._last is not None and self._last[0] is subject and self._last[1] == cov:
      return self._last[2]
    inputs = self._solve_inputs(subject, cov)
    self._last = (subject, cov, inputs)
    return inputs

  def _solve_inputs(self, subject: 'Subject', cov: covariates.Covariates) -> PriorInputs:
    source, model = self.model_for(subject)
    if not self.anchored or model is None:
      if self.anchored:
        self._warn_once('forecast without a baseline label map from a checkpoint without a '
                        'tissue-model regional model (or without any regional model): the '
                        'regional prior is off and the forecast is the network\'s residual '
                        'alone; give --labels for anchored forecasts')
      return PriorInputs(source, np.zeros(self.grid.shape, np.uint8),
                         np.zeros(len(prior_lib.prior_regions(source).rate_regions), np.float32))
    if source == 'labels':
      classes = labels_lib.ids_to_classes(subject.gridded.labels)
      baseline_ml = subject.baseline_volumes_ml()
    else:
      if source != self.prior_source:
        self._warn_once('forecast without a baseline label map: the regional prior acts on '
                        'the tissue model\'s brain, GM, WM and CSF (the checkpoint\'s '
                        'tissue-volume regional model); give --labels for the label regions')
      classes, baseline_ml = self._tissue_inputs(subject)
    predicted = model.log_rates(cov, baseline_ml)
    rate_regions = prior_lib.prior_regions(source).rate_regions
    return PriorInputs(source, classes, np.asarray([predicted.get(r, np.nan)
                                                    for r in rate_regions], np.float32))

  def _warn_once(self, message: str) -> None:
    if message not in self._warned:
      self._warned.add(message)
      logging.warning(message)

  def _tissue_inputs(self, subject: 'Subject') -> tuple[np.ndarray, dict[str, float]]:
    """Tissue classes on the model grid and tissue volumes (mL) of the baseline."""
    seg = (subject.region_map if subject.volume_method == 'tissue'
           else tissue.segment_tissue(subject.image.data))
    classes = preprocess.resample(seg, subject.image.affine, self.grid.shape,
                                  subject.gridded.affine, order=preprocess.NEAREST)
    return classes.astype(np.uint8), volumes.regional_volumes_ml(
        seg, subject.image.voxel_volume_ml, regions=baselines.TISSUE_REGIONS)

  def corrects(self, subject: 'Subject', years: float) -> bool:
    """Whether `rate_correction` applies: a prior, on its own kind of volumes."""
    source, model = self.model_for(subject)
    return model is not None and years >= 0.1 and subject.volume_method == source

  @staticmethod
  def rate_correction(inputs: PriorInputs, years: float, baseline_ml: Mapping[str, float],
                      prior_only_ml: Callable[[np.ndarray], Mapping[str, float]]) -> np.ndarray:
    """What the prior misses on the input grid at `years`: target - realised log rates
    (1/year, one per rate region of `inputs.source`).

    The prior is exact on the model grid; measured on the input's own labels (another
    resolution, trilinearly sampled Jacobian) it realises a few % less of the change (1 % at
    2 mm on a 2 mm input, 5-8 % at 4 mm on a 3 mm input). `RATE_CORRECTION_STEPS` Newton
    steps, each forecasting with the prior alone (`prior_only_ml(correction)`: the volumes
    (mL) with the rates shifted by `correction`), make the anchored forecast's regional
    volumes the regional model's on the input grid too (standard experiment: within 0.001 %
    of the change for hippocampus, ventricles and whole brain; a few % for a structure of
    one or two model voxels on the 8 mm test grids). A secondary region (cortex, cerebral
    WM, thalamus, CSF: `PriorRegions.headline` false) is corrected in the first step only:
    the solve cannot meet its rate exactly (a thin ribbon on the velocity grid), and a
    correction accumulating on it kept hippocampus and whole brain 0.01-0.1 % off.
    """
    rates = inputs.rates
    regions = prior_lib.prior_regions(inputs.source)
    headline = np.asarray(regions.headline)
    correction = np.zeros_like(rates)
    for step in range(RATE_CORRECTION_STEPS):
      realised_ml = prior_only_ml(correction)
      realised = np.array([np.log(max(realised_ml[r], 1e-9) / baseline_ml[r]) / years
                           if baseline_ml.get(r, 0) > 0 else rates[k]
                           for k, r in enumerate(regions.rate_regions)])
      # A region without a predicted rate (NaN) stays unconstrained.
      update = np.where(np.isfinite(rates) & (headline | (step == 0)), rates - realised, 0.0)
      correction = (correction + update).astype(np.float32)
    return correction

  def intervals(self, subject: 'Subject', years: float, predicted_ml: Mapping[str, float]
                ) -> dict[str, tuple[float, float]]:
    """Conformal (lower, upper) mL around the predicted volumes (regional model's spread)."""
    model = self.model_for(subject)[1] if self.anchored else self.regional
    if model is None or subject.volume_method != model.volume_method:
      return {}
    out = {}
    for region in model.regions:
      if region in predicted_ml:
        half = model.conformal_q[region] * model.spread(region, years)
        out[region] = (predicted_ml[region] * float(np.exp(-half)),
                       predicted_ml[region] * float(np.exp(half)))
    return out
