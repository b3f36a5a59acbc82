"""Regional progression model: annual log-volume change per region from baseline observables.

The prior knowledge of the generator (DESIGN.md) and an evaluation method of its own
('regional_model'). Per region r, the annual log change of the volume,

    y = log(V1 / V0) / t   (t: interval in years; compound rate = 100 (exp(y) - 1) %/year),

is a ridge regression on the baseline covariates (diagnosis as MCI/AD indicators, age, sex,
APOE4, MMSE, CDR-SB, education; a missing field is set to its training mean and flagged by
an indicator), the products of the diagnosis indicators with age, APOE4, MMSE and CDR-SB
(`regional_features.INTERACTIONS`: how much a score says about the disease stage, and so the
rate, differs by diagnosis: MMSE sits at its ceiling in most controls, conversion speeds up
MCI), and the baseline anatomy: log(V / head size) of the atrophy markers
(`regional_features.ANATOMY_MARKERS`: hippocampus and lateral ventricles with label maps,
every tissue class with the tissue model), with head size the intracranial volume (whole
brain + CSF + lateral ventricles with label maps, brain + CSF with the tissue model), so the
fractions measure atrophy whatever the head's size. Only the two canonical markers, not
every region: the other fractions (amygdala, thalamus, cortex, white matter, CSF, whole
brain) add little the markers and scores do not carry, and a ridge that spreads its weight
over eight correlated, noisily measured fractions forecast worse. Hippocampal MAE relative
to the population rate, mean of 5 subject splits, all regions -> markers: cohort400 with 30
/ 54 / 120 / 240 training subjects 0.86 -> 0.77, 0.79 -> 0.75, 0.78 -> 0.74, 0.76 -> 0.74
(whole brain 3-9 % better, lateral ventricles 1-4 %); cohort200 (120) 0.82 -> 0.80, whole
brain 0.77 -> 0.75, but lateral ventricles 0.85 -> 0.87; the 4 mm demo cohort (36) is too
noisy to tell (split-to-split sd 0.16). The diagnosis interactions, on top of the markers
(their own penalty factor chosen by cross-validation, `INTERACTION_FACTORS`): cohort400 54 /
120 / 240 training subjects hippocampus 0.75 -> 0.73, 0.74 -> 0.72, 0.74 -> 0.71, ventricles
0.80 -> 0.78, 0.77 -> 0.73, 0.80 -> 0.76; cohort200 hippocampus 0.80 -> 0.76, ventricles
0.87 -> 0.83, whole brain 0.75 -> 0.72; level at 30 and on the demo cohort.

Fitting (`fit`; the solver is `progression.regional_ridge`) handles the pairs of one subject
together: each pair's weight is 1 / (sigma_rate^2 + 2 sigma_meas^2 / t^2) (short intervals
measure a rate less precisely), divided by the subject's number of pairs, so every subject
counts about once. The two variances come from the residuals of a first fit, regressing
squared residuals on [1, 1/t^2]. Training rows are augmented with copies whose covariate
fields are randomly masked (`DROPOUT`), so the missing-value indicators are learned, not
guessed. The ridge penalty of each region is chosen by subject-grouped cross-validation
(`PENALTIES`, `CV_FOLDS`): with a few dozen subjects a strong penalty wins (on the demo
cohort, 36 training subjects, it cut the hippocampal test error by 18 %), with hundreds the
penalty hardly matters. The same cross-validation decides whether the masked copies enter the
fit for complete covariates (`AUGMENTATION_CHOICES`): they shrink the coefficients like a
penalty the ridge cannot undo, which helps a few dozen subjects with noisy rates but costs
accuracy where the covariates explain much of the rate; a region fitted without them keeps a
fit with them for forecasts that lack a field training had (`missing_coefficients`).
Hippocampal MAE relative to the population rate, always with the copies -> chosen: 36
training subjects of the realistic e2e cohort 0.84 -> 0.82 (8 splits), and 0.81 -> 0.76 with
each pair's deviation from the simulator's expected rate shrunk to 40 % (a cohort where the
covariates say more, as a 9-feature ridge suggests of the held-out real-anatomy one;
ventricles 0.80 -> 0.78, whole brain 0.81 -> 0.74); cohort400 at 54 / 120 training subjects
0.73 -> 0.73, 0.72 -> 0.72, cohort200 0.76 -> 0.75; worse at 30 (0.77 -> 0.81), where the
choice is noisiest. Leaving the penalties below 10 out of the grid (`PENALTIES`) makes that
choice less noisy; with it (hippocampus, ventricles, whole brain / population, before ->
after): cohort400 at 30 0.81, 0.83, 0.78 -> 0.79, 0.83, 0.78, at 54, 120 and 240 level (0.72,
0.74, 0.69 at 240), cohort200 0.75, 0.82, 0.72 -> 0.74, 0.82, 0.72, e2e unmoved 0.82, 0.85,
0.82 -> 0.81, 0.85, 0.81, moved 0.84, 0.85, 0.89 -> 0.84, 0.85, 0.84, the demo cohort level
(0.96, 1.02, 0.94); with deviations shrunk to 40 %, e2e unmoved 0.76, 0.78, 0.74 -> 0.72,
0.74, 0.71 and moved 0.74, 0.77, 0.77 -> 0.74, 0.73, 0.73, where the 9-feature ridge (alpha
10) reaches 0.72, 0.78, 0.72 and 0.74, 0.77, 0.74. (Decades only, 10 / 100 / 1000, were 1-2 %
better still on the e2e and demo cohorts but as much worse on cohort200 and cohort400 at 54.)

The rates are then averaged with those of a compact 9-feature ridge, with a weight that
decays with the training subjects (`regional_compact`: half at 25 subjects): with a few dozen
subjects the full model is noisier than the data support, with hundreds it wins.

Prediction: V1 = V0 exp(t y_hat); its predictive spread on the log scale is
s(t) = sqrt(t^2 sigma_rate^2 + 2 sigma_meas^2), and the interval V0 exp(t y_hat +- q s(t))
with q calibrated split-conformally for `coverage` (90 % by default) by
`progression.regional_intervals`, which also fits and calibrates from pair tables
(`fit_on_pairs`).
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from progression import covariates, regional_compact, regional_features, regional_ridge
from progression.errors import ProgressionError

# Ridge penalties tried per region (on standardised coefficients, in units of one training
# row's mean weight); the one with the lowest subject-grouped cross-validation error is kept.
# None below 10: with them a few dozen subjects' noisy CV picked penalties that then forecast
# worse (see the module docstring).
PENALTIES = (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)
# Multipliers of the penalty for the interaction features, chosen with it (1e6: left out).
INTERACTION_FACTORS = (1.0, 3.0, 10.0, 1e6)
# Whether the fit uses the covariate-dropout copies (True) or the original rows only (False),
# chosen with the penalty; a model fitted without them keeps an augmented fit for missing fields.
AUGMENTATION_CHOICES = (True, False)
CV_FOLDS = 5
DROPOUT = 0.15  # Probability a field is masked in each augmented copy of a training row.
AUGMENT_COPIES = 3
DEFAULT_COVERAGE = 0.9
MIN_REGION_SHARE = 0.9  # Regions with a positive volume in fewer pairs than this are left out.
_Z90 = 1.6448536269514722  # Gaussian 90 % quantile: q before calibration.


@dataclasses.dataclass(frozen=True)
class RegionalModel:
  """A fitted regional model (JSON-able through `to_dict` / `from_dict`).

  Attributes:
    volume_method: 'labels' or 'tissue' (how volumes were measured).
    regions: predicted regions, in order.
    feature_names: covariate features, their '_missing' indicators, 'logfrac_<region>' of
      each of `anatomy_regions`, then the interactions 'diagnosis_<dx>*<covariate>'.
    fill: covariate feature -> training mean used when the field is missing.
    mean, scale: standardisation of each feature (training rows).
    coefficients: region -> [intercept, *per standardised feature] (log change per year).
    penalty: region -> ridge penalty chosen by cross-validation (`PENALTIES`).
    interaction_factor: region -> its multiplier for the interaction features
      (`INTERACTION_FACTORS`; empty for models saved before they existed).
    augmented: region -> whether `coefficients` were fitted with the covariate-dropout
      copies (`AUGMENTATION_CHOICES`; empty for older models, which always were).
    missing_coefficients: region -> coefficients fitted with the copies, used instead of
      `coefficients` when one of `given_fields` is missing (only regions not `augmented`).
    given_fields: covariate fields given in most training pairs.
    sigma_rate, sigma_meas: region -> residual sd of the annual log rate (1/year) and of one
      visit's log volume (measurement; dimensionless).
    conformal_q: region -> multiplier of the spread for `coverage` (validation-calibrated,
      else the Gaussian quantile).
    coverage: nominal coverage of `interval_ml`.
    num_subjects: training subjects behind the fit.
    compact: the compact ridge the rates are averaged with (`regional_compact`, on
      `compact_features`; None for models saved before it existed).
    compact_weight: its share of the averaged annual log rate.
  """
  volume_method: str
  regions: tuple[str, ...]
  feature_names: tuple[str, ...]
  fill: dict[str, float]
  mean: tuple[float, ...]
  scale: tuple[float, ...]
  coefficients: dict[str, tuple[float, ...]]
  penalty: dict[str, float]
  sigma_rate: dict[str, float]
  sigma_meas: dict[str, float]
  conformal_q: dict[str, float]
  coverage: float
  num_subjects: int
  interaction_factor: dict[str, float] = dataclasses.field(default_factory=dict)
  augmented: dict[str, bool] = dataclasses.field(default_factory=dict)
  missing_coefficients: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)
  given_fields: tuple[str, ...] = ()
  compact: regional_compact.CompactRidge | None = None
  compact_weight: float = 0.0

  def features(self, cov: covariates.Covariates, baseline_ml: Mapping[str, float]
               ) -> np.ndarray:
    """Standardised feature vector `[len(feature_names)]` of one baseline."""
    interactions = any(regional_features.INTERACTION_MARK in f for f in self.feature_names)
    return (regional_features.feature_vector(cov, baseline_ml, self.anatomy_regions,
                                              self.volume_method, self.fill, interactions)
            - np.asarray(self.mean)) / np.asarray(self.scale)

  @property
  def anatomy_regions(self) -> tuple[str, ...]:
    """Regions whose baseline log fraction of the head is a feature, in feature order."""
    return tuple(f.removeprefix(regional_features.ANATOMY_PREFIX) for f in self.feature_names
                 if f.startswith(regional_features.ANATOMY_PREFIX))

  def log_rates(self, cov: covariates.Covariates, baseline_ml: Mapping[str, float]
                ) -> dict[str, float]:
    """Predicted annual log change (1/year) per region: `full_log_rates` averaged with the
    compact ridge's (weight `compact_weight`)."""
    full = self.full_log_rates(cov, baseline_ml)
    if self.compact is None or self.compact_weight <= 0:
      return full
    compact = self.compact.log_rates(regional_features.compact_features(
        cov, baseline_ml, self.compact.anatomy_regions, self.volume_method))
    w = self.compact_weight
    return {r: (1.0 - w) * full[r] + w * compact[r] for r in self.regions}

  def full_log_rates(self, cov: covariates.Covariates, baseline_ml: Mapping[str, float]
                     ) -> dict[str, float]:
    """The full ridge's annual log change (1/year) per region, before the compact average.

    With the fields training had (`given_fields`), from `coefficients`; with one of them
    missing, from the fit that learned missing fields (`missing_coefficients` where the
    region has one).
    """
    x = np.concatenate([[1.0], self.features(cov, baseline_ml)])
    incomplete = any(getattr(cov, f) is None for f in self.given_fields)
    chosen = self.missing_coefficients if incomplete else {}
    return {r: float(x @ np.asarray(chosen.get(r, self.coefficients[r]))) for r in self.regions}

  def rates_pct_per_year(self, cov: covariates.Covariates, baseline_ml: Mapping[str, float]
                         ) -> dict[str, float]:
    """Predicted compound annual change (signed %/year) per region."""
    return {r: 100.0 * math.expm1(y) for r, y in self.log_rates(cov, baseline_ml).items()}

  def spread(self, region: str, years: float) -> float:
    """Predictive sd of log(V1 / V0) after `years`."""
    return math.sqrt(years ** 2 * self.sigma_rate[region] ** 2
                     + 2.0 * self.sigma_meas[region] ** 2)

  def predict_volumes_ml(self, cov: covariates.Covariates, baseline_ml: Mapping[str, float],
                         years: float) -> dict[str, float]:
    """Follow-up volumes (mL) `years` after the baseline volumes `baseline_ml` (mL)."""
    rates = self.log_rates(cov, baseline_ml)
    return {r: float(baseline_ml[r]) * math.exp(years * rates[r]) for r in self.regions}

  def interval_ml(self, cov: covariates.Covariates, baseline_ml: Mapping[str, float],
                  years: float) -> dict[str, tuple[float, float]]:
    """(lower, upper) follow-up volume (mL) per region, `coverage` prediction interval."""
    rates = self.log_rates(cov, baseline_ml)
    out = {}
    for r in self.regions:
      centre, half = years * rates[r], self.conformal_q[r] * self.spread(r, years)
      out[r] = (float(baseline_ml[r]) * math.exp(centre - half),
                float(baseline_ml[r]) * math.exp(centre + half))
    return out

  def to_dict(self) -> dict[str, Any]:
    data = dataclasses.asdict(self)
    data['compact'] = None if self.compact is None else self.compact.to_dict()
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> 'RegionalModel':
    try:
      return cls(volume_method=str(data['volume_method']), regions=tuple(data['regions']),
                 feature_names=tuple(data['feature_names']),
                 fill={k: float(v) for k, v in data['fill'].items()},
                 mean=tuple(float(v) for v in data['mean']),
                 scale=tuple(float(v) for v in data['scale']),
                 coefficients={r: tuple(float(c) for c in v)
                               for r, v in data['coefficients'].items()},
                 penalty={r: float(v) for r, v in data.get('penalty', {}).items()},
                 sigma_rate={r: float(v) for r, v in data['sigma_rate'].items()},
                 sigma_meas={r: float(v) for r, v in data['sigma_meas'].items()},
                 conformal_q={r: float(v) for r, v in data['conformal_q'].items()},
                 coverage=float(data['coverage']), num_subjects=int(data['num_subjects']),
                 interaction_factor={r: float(v) for r, v
                                     in data.get('interaction_factor', {}).items()},
                 augmented={r: bool(v) for r, v in data.get('augmented', {}).items()},
                 missing_coefficients={r: tuple(float(c) for c in v) for r, v
                                       in data.get('missing_coefficients', {}).items()},
                 given_fields=tuple(data.get('given_fields', ())),
                 compact=(regional_compact.CompactRidge.from_dict(data['compact'])
                          if data.get('compact') else None),
                 compact_weight=float(data.get('compact_weight', 0.0)))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise ProgressionError(f'regional model: malformed dict ({type(e).__name__}: {e})'
                             ) from None


def _masked(cov: covariates.Covariates, rng: np.random.Generator) -> covariates.Covariates:
  changes = {f: None for f in regional_features.fields_used() if rng.random() < DROPOUT}
  return dataclasses.replace(cov, **changes)


def fit(table: pd.DataFrame, pair_covariates: Sequence[covariates.Covariates],
        volume_method: str, seed: int = 0) -> RegionalModel:
  """Fits the model on training pairs.

  Args:
    table: `baselines.training_volume_table` rows (subject, region, interval_years,
      baseline_ml, followup_ml; one row per pair x region, pairs in a fixed order).
    pair_covariates: the baseline covariates of each pair, in the table's pair order.
    volume_method: 'labels' or 'tissue'.
    seed: seeds the covariate-dropout augmentation.

  Raises:
    ProgressionError: for an empty table or covariates not matching its pairs.
  """
  pairs = pairs_wide(table)
  if len(pairs) == 0:
    raise ProgressionError('regional model: no training pairs with valid volumes')
  if len(pair_covariates) != pairs.attrs['num_pairs']:
    raise ProgressionError(f'regional model: {len(pair_covariates)} covariate rows for '
                           f'{pairs.attrs["num_pairs"]} pairs')
  regions = tuple(pairs.attrs['regions'])
  anatomy = regional_features.anatomy_regions(regions, volume_method)
  covs = [pair_covariates[i] for i in pairs['pair']]
  raw = [regional_features.raw_covariate_features(c) for c in covs]
  fill = {f: float(np.mean([r[f] for r in raw if r[f] is not None] or [0.0]))
          for f in regional_features.COVARIATE_FEATURES}
  rng = np.random.default_rng(seed)
  rows = []
  for copy in range(1 + AUGMENT_COPIES):
    for cov, baseline in zip(covs, pairs['baseline'].tolist()):
      rows.append(regional_features.feature_vector(
          cov if copy == 0 else _masked(cov, rng), baseline, anatomy, volume_method, fill))
  design, mean, scale = regional_ridge.standardized_design(np.stack(rows))
  years = np.tile(pairs['years'].to_numpy(), 1 + AUGMENT_COPIES)
  per_subject = pairs.groupby('subject')['pair'].transform('count').to_numpy()
  share = np.tile(1.0 / per_subject, 1 + AUGMENT_COPIES) / (1 + AUGMENT_COPIES)
  fold = np.tile(subject_folds(pairs['subject'].to_numpy(), rng), 1 + AUGMENT_COPIES)
  num_interactions = len(regional_features.interaction_names())
  interacting = np.arange(design.shape[1]) >= design.shape[1] - num_interactions
  coefficients, penalty, factor, sigma_rate, sigma_meas = {}, {}, {}, {}, {}
  augmented, missing_coefficients = {}, {}
  for region in regions:
    y = np.tile(pairs[f'y_{region}'].to_numpy(), 1 + AUGMENT_COPIES)
    options = regional_ridge.cross_validated_options(
        design, y, share * years ** 2, fold, len(pairs), interacting, _cv_grid())
    augmented[region] = min(options, key=lambda a: options[a][2])
    penalty[region], factor[region], _ = options[augmented[region]]
    rows = slice(None) if augmented[region] else slice(0, len(pairs))
    beta, rate_var, meas_var = regional_ridge.two_step_ridge(
        design[rows], y[rows], share[rows], years[rows],
        regional_ridge.penalty_vector(penalty[region], factor[region], interacting), len(pairs))
    coefficients[region] = tuple(float(b) for b in beta)
    sigma_rate[region], sigma_meas[region] = math.sqrt(rate_var), math.sqrt(meas_var)
    if not augmented[region]:
      penalties = regional_ridge.penalty_vector(*options[True][:2], interacting)
      fallback = regional_ridge.two_step_ridge(design, y, share, years, penalties, len(pairs))[0]
      missing_coefficients[region] = tuple(float(b) for b in fallback)
  names = regional_features.feature_names(anatomy)
  compact = regional_compact.fit(
      np.stack([regional_features.compact_features(c, b, anatomy, volume_method)
                for c, b in zip(covs, pairs['baseline'].tolist())]),
      {r: pairs[f'y_{r}'].to_numpy() for r in regions}, anatomy)
  num_subjects = int(pairs['subject'].nunique())
  return RegionalModel(volume_method=volume_method, regions=regions, feature_names=names,
                       fill=fill, mean=tuple(float(m) for m in mean),
                       scale=tuple(float(s) for s in scale), coefficients=coefficients,
                       penalty=penalty, interaction_factor=factor, augmented=augmented,
                       missing_coefficients=missing_coefficients,
                       given_fields=_given_fields(covs),
                       sigma_rate=sigma_rate, sigma_meas=sigma_meas,
                       conformal_q={r: _Z90 for r in regions}, coverage=DEFAULT_COVERAGE,
                       num_subjects=num_subjects, compact=compact,
                       compact_weight=regional_compact.blend_weight(num_subjects))


def _given_fields(covs: Sequence[covariates.Covariates]) -> tuple[str, ...]:
  """The covariate fields given in at least half of `covs`."""
  return tuple(f for f in regional_features.fields_used()
               if np.mean([getattr(c, f) is None for c in covs]) < 0.5)


def subject_folds(subjects: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A fold id in [0, CV_FOLDS) per row, the same for all rows of one subject (seeded)."""
  codes = pd.factorize(subjects)[0]
  return rng.permutation(codes.max() + 1)[codes] % CV_FOLDS


def _cv_grid() -> list[tuple[float, float, bool]]:
  """(penalty, interaction factor, augmented) settings that cross-validation compares."""
  return [(p, f, a) for a in AUGMENTATION_CHOICES for p in PENALTIES
          for f in INTERACTION_FACTORS]


def pairs_wide(table: pd.DataFrame, regions: Sequence[str] | None = None) -> pd.DataFrame:
  """One row per pair with valid volumes: pair index, subject, years, baseline dict, y_<r>.

  `table` holds each pair's regions in consecutive rows (`baselines.training_volume_table`);
  `regions`: those to keep (default: the regions with a positive volume in most pairs).
  """
  all_regions = list(pd.unique(table['region']))
  per_pair = len(all_regions)
  num_pairs = len(table) // per_pair
  positive = (table['baseline_ml'].to_numpy() > 0) & (table['followup_ml'].to_numpy() > 0)
  share = pd.Series(positive).groupby(table['region'].to_numpy()).mean()
  # A region most label maps lack (e.g. no CSF label in some conventions) is not modelled,
  # rather than losing every pair that lacks it.
  if regions is None:
    regions = [r for r in all_regions if share[r] >= MIN_REGION_SHARE]
  records = []
  for i in range(num_pairs):
    rows = table.iloc[i * per_pair:(i + 1) * per_pair]
    baseline = dict(zip(rows['region'], rows['baseline_ml'].astype(float)))
    followup = dict(zip(rows['region'], rows['followup_ml'].astype(float)))
    years = float(rows['interval_years'].iloc[0])
    if years <= 0 or any(baseline[r] <= 0 or followup[r] <= 0 for r in regions):
      continue
    records.append({'pair': i, 'subject': rows['subject'].iloc[0], 'years': years,
                    'baseline': baseline,
                    **{f'y_{r}': math.log(followup[r] / baseline[r]) / years for r in regions}})
  wide = pd.DataFrame.from_records(records)
  wide.attrs.update(regions=regions, num_pairs=num_pairs)
  return wide
