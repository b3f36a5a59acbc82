"""Forecasting methods under evaluation, how their volumes are measured, and two baselines.

A *method* (`Method`) has a `name` and `predict(pair_row, baseline, baseline_labels) ->
Prediction`; `report.evaluate_pairs` compares its predictions with the real follow-ups. The
learned model is wrapped as one by the evaluation launcher; here are the two references it
must beat, both predicting the baseline image as their image:

- `NoChangeBaseline` ('no_change'): every follow-up volume equals the baseline volume.
- `PopulationRateBaseline` ('population_rate'): each region of the baseline changes at its
  population annual rate, V(t) = V0 (1 + rate / 100) ** t (compound percent/year, as in
  `volumes.annualized_percent_change`), with rate = the diagnosis group's mean rate plus a
  linear age term, fitted on the training pairs (`fit_population_rates`) and stored as a
  JSON-able dict (`PopulationRates.to_dict`).

Volumes (mL) come from the label maps (`volumes.regional_volumes_ml`, regions
`labels.REGIONS`) when the cohort has them, else from the built-in tissue model
(`TISSUE_REGIONS` of `tissue.segment_tissue`): see `measure_volumes_ml`.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
import pandas as pd

from progression import cohort, covariates, io
from progression.errors import ProgressionError
from progression.evaluation import tissue, visit_volumes, volumes

# Tissue "regions" when a cohort has no label maps: classes of `tissue.segment_tissue`
# (the same names and classes as `progression.forecast.TISSUE_CLASSES`).
TISSUE_REGIONS = {'csf': (1,), 'gray_matter': (2,), 'white_matter': (3,), 'brain': (2, 3)}
VOLUME_METHODS = ('labels', 'tissue')
ALL = 'all'  # Key of the all-subjects rate (used for unseen or missing diagnoses).
FIT_COLUMNS = ('diagnosis', 'age_years', 'interval_years', 'region', 'baseline_ml',
               'followup_ml')
# The age term is used only when the training pairs support it (see `_pooled_age_slope`).
MIN_AGE_PAIRS = 10  # Training pairs with a known age.
MIN_AGE_VARIANCE_YEARS2 = 1.0  # Within-diagnosis age variance.
MIN_AGE_T = 2.0  # |slope| / its standard error.
MIN_RATE_PCT_PER_YEAR = -99.0  # Predictions never shrink a region below 1 % a year.


@dataclasses.dataclass(frozen=True)
class Prediction:
  """A method's forecast of one follow-up.

  Attributes:
    image: `[x, y, z]` predicted follow-up on the baseline's canonical grid (any intensity
      unit; the evaluation normalises it).
    volumes_ml: region name -> predicted follow-up volume (mL).
    volume_method: 'labels' or 'tissue': how the regions are defined.
    intervals_ml: optional region -> (lower, upper) prediction interval of the volume (mL).
  """
  image: np.ndarray
  volumes_ml: Mapping[str, float]
  volume_method: str
  intervals_ml: Mapping[str, tuple[float, float]] | None = None


class Method(Protocol):
  """A forecasting method under evaluation."""
  name: str

  def predict(self, pair_row: Mapping[str, Any], baseline: io.Volume,
              baseline_labels: io.Volume | None) -> Prediction:
    """Forecasts the follow-up of `pair_row` (a `cohort.make_pairs` row) from its baseline."""


def optional_text(value: Any) -> str | None:
  """A table cell as stripped text; None for None, NaN, NA or ''."""
  if value is None or (np.ndim(value) == 0 and pd.isna(value)):
    return None
  return str(value).strip() or None


def volume_method_of(pairs: pd.DataFrame) -> str:
  """'labels' when every pair has baseline and follow-up label maps, else 'tissue'."""
  has = [optional_text(p) is not None
         for column in ('baseline_labels', 'followup_labels') for p in pairs[column]]
  return 'labels' if has and all(has) else 'tissue'


def measure_volumes_ml(image: io.Volume | None, labels: io.Volume | None,
                       volume_method: str) -> dict[str, float]:
  """Regional volumes (mL) of one visit, measured the way `volume_method` says.

  'labels': `volumes.regional_volumes_ml` of the label map (`labels.REGIONS`); 'tissue':
  `TISSUE_REGIONS` of `tissue.segment_tissue(image)` inside `tissue.brain_mask(image)`.
  """
  if volume_method == 'labels':
    if labels is None:
      where = image.path if image is not None and image.path else '<image>'
      raise ProgressionError(f'{where}: volume method "labels" needs a label map')
    return volumes.regional_volumes_ml(labels.data, labels.voxel_volume_ml)
  if volume_method != 'tissue':
    raise ProgressionError(f'volume_method must be one of {VOLUME_METHODS}, got '
                           f'{volume_method!r}')
  if image is None:
    raise ProgressionError('volume method "tissue" needs the image')
  seg = tissue.segment_tissue(image.data, tissue.brain_mask(image.data))
  return volumes.regional_volumes_ml(seg, image.voxel_volume_ml, regions=TISSUE_REGIONS)


def annualized_rate_pct(v0: Any, v1: Any, years: Any) -> np.ndarray:
  """Compound annual change 100 ((v1 / v0) ** (1 / years) - 1) in percent/year, elementwise.

  NaN where it is undefined (v0 <= 0, v1 < 0 or years <= 0) instead of raising, since a
  region can be absent from one subject's label map.
  """
  v0, v1, years = (np.asarray(x, dtype=np.float64) for x in (v0, v1, years))
  ok = (v0 > 0) & (v1 >= 0) & (years > 0)
  ratio = np.where(ok, v1, 1.0) / np.where(ok, v0, 1.0)
  return np.where(ok, 100.0 * (ratio ** (1.0 / np.where(ok, years, 1.0)) - 1.0), np.nan)


class NoChangeBaseline:
  """Predicts no change: the follow-up image and volumes are the baseline's."""
  name = 'no_change'

  def __init__(self, volume_method: str):
    self.volume_method = volume_method

  def predict(self, pair_row: Mapping[str, Any], baseline: io.Volume,
              baseline_labels: io.Volume | None) -> Prediction:
    del pair_row  # The same prediction for any interval.
    return Prediction(image=baseline.data,
                      volumes_ml=measure_volumes_ml(baseline, baseline_labels,
                                                    self.volume_method),
                      volume_method=self.volume_method)


@dataclasses.dataclass(frozen=True)
class PopulationRates:
  """Regional annual rates by diagnosis with a linear age term (compound percent/year).

  rate(region, diagnosis, age) = rates_pct_per_year[region][diagnosis]
      + age_slope_pct_per_year2[region] * (clip(age, *age_range_years) - age_center_years),
  with the `ALL` (all training pairs) rate for a diagnosis without training pairs or a
  missing diagnosis, and no age term for a missing age. Ages are clipped to the training
  range so the linear term never extrapolates.

  Attributes:
    volume_method: 'labels' or 'tissue' (how the fitted volumes were measured).
    age_center_years: mean baseline age of the training pairs (years).
    age_range_years: (youngest, oldest) baseline age of the training pairs (years).
    rates_pct_per_year: region -> diagnosis (or 'all') -> rate at the centre age.
    age_slope_pct_per_year2: region -> change of the rate per year of age (percent/year
      per year); pooled within diagnoses; 0 when ages are too few, too alike, or the slope
      is not distinguishable from noise.
    num_pairs: region -> diagnosis (or 'all') -> training pairs behind the rate.
  """
  volume_method: str
  age_center_years: float
  age_range_years: tuple[float, float]
  rates_pct_per_year: dict[str, dict[str, float]]
  age_slope_pct_per_year2: dict[str, float]
  num_pairs: dict[str, dict[str, int]]

  def rate_pct_per_year(self, region: str, diagnosis: str | None,
                        age_years: float | None) -> float:
    """The annual rate (percent/year) for a baseline of this diagnosis and age (years)."""
    if region not in self.rates_pct_per_year:
      raise ProgressionError(f'population rates: region {region!r} was not fitted (fitted: '
                             f'{sorted(self.rates_pct_per_year)})')
    by_diagnosis = self.rates_pct_per_year[region]
    rate = by_diagnosis.get(diagnosis, by_diagnosis[ALL]) if diagnosis else by_diagnosis[ALL]
    if age_years is not None and np.isfinite(age_years):
      age = float(np.clip(age_years, *self.age_range_years))
      rate += self.age_slope_pct_per_year2[region] * (age - self.age_center_years)
    return float(rate)

  def predict_volumes_ml(self, baseline_ml: Mapping[str, float], diagnosis: str | None,
                         age_years: float | None, years: float) -> dict[str, float]:
    """Follow-up volumes (mL) `years` after `baseline_ml`: V0 (1 + rate / 100) ** years."""
    return {region: float(v0) * (1.0 + max(self.rate_pct_per_year(region, diagnosis, age_years),
                                           MIN_RATE_PCT_PER_YEAR) / 100.0) ** float(years)
            for region, v0 in baseline_ml.items()}

  def to_dict(self) -> dict[str, Any]:
    """A JSON-able dict (inverse of `from_dict`)."""
    return {**dataclasses.asdict(self), 'age_range_years': list(self.age_range_years)}

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> 'PopulationRates':
    try:
      return cls(volume_method=str(data['volume_method']),
                 age_center_years=float(data['age_center_years']),
                 age_range_years=tuple(float(a) for a in data['age_range_years']),
                 rates_pct_per_year={r: {d: float(v) for d, v in by_dx.items()}
                                     for r, by_dx in data['rates_pct_per_year'].items()},
                 age_slope_pct_per_year2={r: float(v) for r, v in
                                          data['age_slope_pct_per_year2'].items()},
                 num_pairs={r: {d: int(n) for d, n in by_dx.items()}
                            for r, by_dx in data['num_pairs'].items()})
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise ProgressionError(f'population rates: malformed dict ({type(e).__name__}: {e})'
                             ) from None


def fit_population_rates(table: pd.DataFrame, volume_method: str) -> PopulationRates:
  """Fits `PopulationRates` on training pairs, one row per pair x region (`FIT_COLUMNS`).

  Each row gives a pair's annual rate r = `annualized_rate_pct(baseline_ml, followup_ml,
  interval_years)` (rows where it is undefined are skipped). Per region, the age slope is the
  least-squares slope of r on age pooled within diagnoses (so it does not absorb the older
  age of the AD group); then each diagnosis' rate is the mean of r - slope (age - centre)
  over its pairs, and the `ALL` rate the mean over every pair. Pairs count equally.

  Raises:
    ProgressionError: when columns are missing or the table has no rows.
  """
  missing = [c for c in FIT_COLUMNS if c not in table.columns]
  if missing:
    raise ProgressionError(f'fit_population_rates: table lacks column(s) {missing}')
  if len(table) == 0:
    raise ProgressionError('fit_population_rates: no training pairs')
  rate = annualized_rate_pct(table['baseline_ml'], table['followup_ml'], table['interval_years'])
  age = pd.to_numeric(table['age_years'], errors='coerce').to_numpy(np.float64)
  diagnosis = np.array([optional_text(d) or 'unknown' for d in table['diagnosis']], object)
  known_ages = age[np.isfinite(age) & np.isfinite(rate)]
  center = float(known_ages.mean()) if known_ages.size else 0.0
  age_range = ((float(known_ages.min()), float(known_ages.max())) if known_ages.size
               else (center, center))
  rates, slopes, counts = {}, {}, {}
  for region in pd.unique(table['region']):
    rows = (table['region'].to_numpy() == region) & np.isfinite(rate)
    r, a, dx = rate[rows], age[rows], diagnosis[rows]
    slope = _pooled_age_slope(r, a, dx)
    adjusted = r - slope * np.where(np.isfinite(a), a - center, 0.0)
    groups = [d for d in covariates.DIAGNOSES if d in set(dx)]
    rates[region] = {ALL: float(adjusted.mean()) if adjusted.size else 0.0,
                     **{d: float(adjusted[dx == d].mean()) for d in groups}}
    counts[region] = {ALL: int(adjusted.size), **{d: int((dx == d).sum()) for d in groups}}
    slopes[region] = float(slope)
  return PopulationRates(volume_method=volume_method, age_center_years=center,
                         age_range_years=age_range,
                         rates_pct_per_year=rates, age_slope_pct_per_year2=slopes,
                         num_pairs=counts)


def _pooled_age_slope(rate: np.ndarray, age: np.ndarray, diagnosis: np.ndarray) -> float:
  """Least-squares slope of rate on age with one intercept per diagnosis (percent/year^2).

  0 (no age term) unless at least `MIN_AGE_PAIRS` pairs have an age, their within-diagnosis
  age variance reaches `MIN_AGE_VARIANCE_YEARS2`, and |slope| >= `MIN_AGE_T` standard errors:
  on small or noisy training sets an age term would mostly fit noise.
  """
  known = np.isfinite(age)
  groups = sorted(set(diagnosis[known]), key=str)  # Sorted: float sums must not depend on hashing.
  dof = int(known.sum()) - len(groups) - 1
  if known.sum() < MIN_AGE_PAIRS or dof < 1:
    return 0.0
  sxx = sxy = syy = 0.0
  for d in groups:
    group = known & (diagnosis == d)
    da, dr = age[group] - age[group].mean(), rate[group] - rate[group].mean()
    sxx, sxy, syy = sxx + float(da @ da), sxy + float(da @ dr), syy + float(dr @ dr)
  if sxx / known.sum() < MIN_AGE_VARIANCE_YEARS2:
    return 0.0
  slope = sxy / sxx
  standard_error = np.sqrt(max(syy - slope * sxy, 0.0) / dof / sxx)
  return slope if abs(slope) >= MIN_AGE_T * standard_error else 0.0


def training_volume_table(pairs: pd.DataFrame, volume_method: str,
                          progress: Callable[[int, int], None] | None = None,
                          known: visit_volumes.VisitVolumes | None = None) -> pd.DataFrame:
  """Measures the baseline and follow-up volumes of training pairs -> `FIT_COLUMNS` rows.

  Each visit is measured once, however many pairs it belongs to, and not at all when `known`
  holds its volumes (new measurements are added to `known` and saved). `progress(done,
  total)` is called after each pair.
  """
  known = visit_volumes.VisitVolumes(None) if known is None else known
  labels_method = volume_method == 'labels'

  def visit_ml(image_path: Any, labels_path: Any) -> dict[str, float]:
    image_path, labels_path = optional_text(image_path), optional_text(labels_path)
    measured_file = labels_path if labels_method else image_path
    if measured_file is None:
      raise ProgressionError(f'{image_path or labels_path or "<visit>"}: volume method '
                             f'"{volume_method}" needs '
                             + ('a label map' if labels_method else 'the image'))
    key = known.key(volume_method, measured_file)
    volumes_ml = None if key is None else known.get(key)
    if volumes_ml is None:
      volume = (io.load_labels if labels_method else io.load_image)(measured_file)
      volumes_ml = measure_volumes_ml(None if labels_method else volume,
                                      volume if labels_method else None, volume_method)
      if key is not None:
        known.put(key, volumes_ml)
    return volumes_ml

  records = []
  rows = pairs.to_dict('records')
  for done, row in enumerate(rows, start=1):
    v0 = visit_ml(row['baseline_image'], row['baseline_labels'])
    v1 = visit_ml(row['followup_image'], row['followup_labels'])
    records += [{'subject': row['subject'], 'diagnosis': optional_text(row['diagnosis']),
                 'age_years': row['age_years'], 'interval_years': float(row['interval_years']),
                 'region': region, 'baseline_ml': v0[region], 'followup_ml': v1[region]}
                for region in v0]
    if progress is not None:
      progress(done, len(rows))
  known.save()
  return pd.DataFrame.from_records(records, columns=['subject', *FIT_COLUMNS])


class PopulationRateBaseline:
  """Applies `PopulationRates` to the baseline's measured regional volumes."""
  name = 'population_rate'

  def __init__(self, rates: PopulationRates):
    self.rates = rates

  def predict(self, pair_row: Mapping[str, Any], baseline: io.Volume,
              baseline_labels: io.Volume | None) -> Prediction:
    baseline_ml = measure_volumes_ml(baseline, baseline_labels, self.rates.volume_method)
    age = pd.to_numeric(pair_row.get('age_years'), errors='coerce')
    predicted = self.rates.predict_volumes_ml(
        baseline_ml, optional_text(pair_row.get('diagnosis')),
        None if pd.isna(age) else float(age), float(pair_row['interval_years']))
    return Prediction(image=baseline.data, volumes_ml=predicted,
                      volume_method=self.rates.volume_method)


class RegionalModelBaseline:
  """Applies a fitted `regional_model.RegionalModel` to the baseline's measured volumes."""
  name = 'regional_model'

  def __init__(self, model: 'regional_model.RegionalModel'):
    self.model = model

  def predict(self, pair_row: Mapping[str, Any], baseline: io.Volume,
              baseline_labels: io.Volume | None) -> Prediction:
    baseline_ml = measure_volumes_ml(baseline, baseline_labels, self.model.volume_method)
    cov = cohort.covariates_of(pair_row)
    years = float(pair_row['interval_years'])
    predicted = self.model.predict_volumes_ml(cov, baseline_ml, years)
    interval = self.model.interval_ml(cov, baseline_ml, years)
    return Prediction(image=baseline.data,
                      volumes_ml={r: predicted.get(r, math.nan) for r in baseline_ml},
                      volume_method=self.model.volume_method,
                      intervals_ml=interval)
