"""The synthetic cohort's disease model: a latent stage drives anatomy, scores and atrophy rates.

Each subject has a continuous disease stage `S` (dimensionless; ~0 healthy, ~1 typical
dementia), drawn within its baseline diagnosis, `S ~ N(STAGE_PRIOR[dx])`. As in real
Alzheimer's disease, the same stage drives

- the baseline anatomy relative to the subject's own head size (`phantom.AnatomyFactors`):
  log volume factors of hippocampi, amygdalae and (inferior) lateral ventricles, and the
  brain's size inside the skull, each `slope * S + age term + N(0, sd)` (`_ANATOMY`);
- the baseline scores: MMSE = round(29.7 - 7.5 S + N(0, 1)), clipped to [0, 30];
  CDR-SB = round-to-half(-0.4 + 5 S + N(0, 0.6)), clipped to [0, 18];
- the future annual rates (compound %/year), linear in S through the literature means at the
  diagnosis' mean stages (hippocampus CN -1.4, MCI ~-2.9, AD -4.7 %; whole brain -0.5,
  -1.2, -1.9 %; lateral ventricles +3, +7, +12 %; amygdala 0.85 x hippocampus), times an age
  term (+1.5 % of the rate per year of age above 73), APOE4 (+8 % per allele) and, for MCI,
  conversion (probability sigmoid((S - 0.6) / 0.08); converters 1.2 x, stable 0.92 x).

What no forecaster can see is modest and documented: a per-subject log-normal factor
(sd 0.10, shared by all regions) and a per-region one (sd 0.05), both mean 1, and whether an
MCI subject converts beyond what its stage implies. Head size varies (sex and a random
factor), so a raw volume is not the stage; a volume *fraction* of the head is.

`expected_rates` is the best any forecaster can do from the baseline observables
(diagnosis, age, sex, APOE4, MMSE, CDR-SB and the anatomy factors before the phantom's
per-side shape jitter and rendering): E[rate | observables] under this model, by exact
quadrature over the posterior of the scalar stage (Gaussian prior and Gaussian-linear anatomy
likelihoods; the rounded and clipped scores enter as interval probabilities).
"""

import dataclasses
import math

import numpy as np
from scipy import special

from progression import phantom

DIAGNOSES = ('CN', 'MCI', 'AD')
DIAGNOSIS_FRACTIONS = (0.40, 0.35, 0.25)
STAGE_PRIOR = {'CN': (0.15, 0.12), 'MCI': (0.55, 0.15), 'AD': (1.0, 0.18)}  # (mean, sd)
RATE_REGIONS = ('hippocampus', 'amygdala', 'lateral_ventricles', 'whole_brain')
# rate(S) = intercept + slope * S (signed compound %/year) before age, APOE4 and conversion.
_RATE_LINES = {
    'hippocampus': (-0.818, -3.882),
    'lateral_ventricles': (1.412, 10.588),
    'whole_brain': (-0.253, -1.647),
}
_AMYGDALA_PER_HIPPOCAMPUS = 0.85
_MIN_RATE_FRACTION = 0.05  # |rate| >= 5 % of the rate at the CN mean stage.
_AGE_MEAN = {'CN': 72.0, 'MCI': 73.0, 'AD': 75.0}
_APOE4_P = {'CN': (0.72, 0.25, 0.03), 'MCI': (0.50, 0.38, 0.12), 'AD': (0.35, 0.45, 0.20)}
AGE_SLOPE_PER_YEAR, AGE_REFERENCE_YEARS = 0.015, 73.0
APOE4_SLOPE = 0.08
CONVERSION_STAGE, CONVERSION_WIDTH = 0.6, 0.08
CONVERTER_SPEED, STABLE_SPEED = 1.2, 0.92
SUBJECT_NOISE_SD, REGION_NOISE_SD = 0.10, 0.05
# Anatomy: name -> (stage slope, aging slope per decade above 72 years, sd), in log units
# (the brain's factor is linear). These are the observable anatomy of `expected_rates`.
_ANATOMY = {
    'hippocampus': (-0.28, -0.035, 0.06),
    'amygdala': (-0.22, -0.03, 0.06),
    'lateral_ventricle': (0.75, 0.16, 0.18),
    'inferior_lateral_ventricle': (1.0, 0.2, 0.2),
    'brain': (-0.02, -0.012, 0.008),
}
_MMSE = (29.7, -7.5, 1.0)  # intercept, stage slope, sd
_CDRSB = (-0.4, 5.0, 0.6)
_STAGE_GRID = np.linspace(-1.0, 3.0, 1601)


@dataclasses.dataclass(frozen=True)
class Baseline:
  """A subject's baseline draw: covariates, stage, anatomy and true rates (%/year)."""
  diagnosis: str
  age_years: float
  sex: str
  apoe4: int
  education_years: int
  stage: float
  mmse: int
  cdrsb: float
  converter: bool
  head_scale: float
  anatomy: phantom.AnatomyFactors
  rates: dict


def _aging(age_years: float) -> float:
  return float(np.clip((age_years - 72.0) / 10.0, -1.5, 2.0))


def _round_half(x: float) -> float:
  return float(np.round(2 * x) / 2)


def rate_at_stage(region: str, stage: np.ndarray, diagnosis: str, age_years: float,
                  apoe4: int, converter: np.ndarray | bool | None) -> np.ndarray:
  """Mean annual rate (signed %/year) of `region` at `stage`, before the unobservable noise.

  `converter` None gives the expectation over conversion at that stage (MCI only).
  """
  if region == 'amygdala':
    return _AMYGDALA_PER_HIPPOCAMPUS * rate_at_stage('hippocampus', stage, diagnosis, age_years,
                                                     apoe4, converter)
  intercept, slope = _RATE_LINES[region]
  base = intercept + slope * np.asarray(stage, np.float64)
  floor = _MIN_RATE_FRACTION * abs(intercept + slope * STAGE_PRIOR['CN'][0])
  base = np.sign(slope) * np.maximum(np.abs(base) * (np.sign(base) == np.sign(slope)), floor)
  modifier = (1.0 + AGE_SLOPE_PER_YEAR * (age_years - AGE_REFERENCE_YEARS)) * (
      1.0 + APOE4_SLOPE * apoe4)
  if diagnosis == 'MCI':
    if converter is None:
      p = conversion_probability(stage)
      modifier = modifier * (p * CONVERTER_SPEED + (1 - p) * STABLE_SPEED)
    else:
      modifier = modifier * np.where(converter, CONVERTER_SPEED, STABLE_SPEED)
  return base * modifier


def conversion_probability(stage: np.ndarray) -> np.ndarray:
  """P(an MCI subject converts to AD during follow-up | stage)."""
  return special.expit((np.asarray(stage, np.float64) - CONVERSION_STAGE) / CONVERSION_WIDTH)


def draw_baseline(rng: np.random.Generator, diagnosis: str) -> Baseline:
  """Draws one subject of `diagnosis` (all randomness from `rng`)."""
  age = float(np.clip(rng.normal(_AGE_MEAN[diagnosis], 7.0), 60.0, 90.0))
  sex = 'F' if rng.random() < 0.5 else 'M'
  education = int(np.clip(round(rng.normal({'CN': 16.2, 'MCI': 15.8, 'AD': 15.1}[diagnosis],
                                           2.8)), 6, 22))
  apoe4 = int(rng.choice(3, p=_APOE4_P[diagnosis]))
  mean, sd = STAGE_PRIOR[diagnosis]
  stage = float(rng.normal(mean, sd))
  aging = _aging(age)
  logs = {name: slope * stage + age_slope * aging + rng.normal(0.0, noise)
          for name, (slope, age_slope, noise) in _ANATOMY.items()}
  anatomy = phantom.AnatomyFactors(
      hippocampus=math.exp(logs['hippocampus']), amygdala=math.exp(logs['amygdala']),
      lateral_ventricle=math.exp(logs['lateral_ventricle']),
      inferior_lateral_ventricle=math.exp(logs['inferior_lateral_ventricle']),
      brain=1.0 + logs['brain'], cortex_thickness=math.exp(-0.08 * stage + rng.normal(0, 0.04)),
      thalamus=math.exp(-0.04 * stage + rng.normal(0, 0.05)))
  mmse = int(np.clip(round(_MMSE[0] + _MMSE[1] * stage + rng.normal(0, _MMSE[2])), 0, 30))
  cdrsb = float(np.clip(_round_half(_CDRSB[0] + _CDRSB[1] * stage + rng.normal(0, _CDRSB[2])),
                        0.0, 18.0)) + 0.0
  converter = bool(diagnosis == 'MCI' and rng.random() < conversion_probability(stage))
  head_scale = math.exp(rng.normal(0.03 if sex == 'M' else -0.03, 0.035))
  shared = rng.normal() * SUBJECT_NOISE_SD - SUBJECT_NOISE_SD ** 2 / 2
  rates = {}
  for region in RATE_REGIONS:
    noise = rng.normal() * REGION_NOISE_SD - REGION_NOISE_SD ** 2 / 2
    mean_rate = rate_at_stage(region, stage, diagnosis, age, apoe4, converter)
    rates[region] = float(mean_rate * math.exp(shared + noise))
  return Baseline(diagnosis, age, sex, apoe4, education, stage, mmse, cdrsb, converter,
                  head_scale, anatomy, rates)


def stage_posterior(baseline: Baseline) -> np.ndarray:
  """Posterior weights of the stage on `_STAGE_GRID` given the baseline observables."""
  s = _STAGE_GRID
  mean, sd = STAGE_PRIOR[baseline.diagnosis]
  log_p = -0.5 * ((s - mean) / sd) ** 2
  aging = _aging(baseline.age_years)
  a = baseline.anatomy
  observed = {'hippocampus': math.log(a.hippocampus), 'amygdala': math.log(a.amygdala),
              'lateral_ventricle': math.log(a.lateral_ventricle),
              'inferior_lateral_ventricle': math.log(a.inferior_lateral_ventricle),
              'brain': a.brain - 1.0}
  for name, (slope, age_slope, noise) in _ANATOMY.items():
    log_p += -0.5 * ((observed[name] - slope * s - age_slope * aging) / noise) ** 2
  log_p += _log_interval_probability(baseline.mmse, 0.5, 0.0, 30.0, _MMSE, s)
  log_p += _log_interval_probability(baseline.cdrsb, 0.25, 0.0, 18.0, _CDRSB, s)
  weights = np.exp(log_p - log_p.max())
  return weights / weights.sum()


def _log_interval_probability(value: float, half_width: float, low: float, high: float,
                              line: tuple[float, float, float], s: np.ndarray) -> np.ndarray:
  """log P(round(intercept + slope s + N(0, sd)) == value), clipped to [low, high]."""
  intercept, slope, sd = line
  mu = intercept + slope * s
  upper = math.inf if value >= high else value + half_width
  lower = -math.inf if value <= low else value - half_width
  p = special.ndtr((upper - mu) / sd) - special.ndtr((lower - mu) / sd)
  return np.log(np.maximum(p, 1e-300))


def expected_rates(baseline: Baseline) -> dict[str, float]:
  """E[annual rate (%/year) | baseline observables], per region (see the module docstring)."""
  weights = stage_posterior(baseline)
  return {region: float(weights @ rate_at_stage(region, _STAGE_GRID, baseline.diagnosis,
                                                baseline.age_years, baseline.apoe4, None))
          for region in RATE_REGIONS}


def score_trajectory(baseline: Baseline, years: float, conversion_years: float,
                     rng: np.random.Generator) -> tuple[int, float]:
  """MMSE and CDR-SB `years` after baseline.

  Yearly decline grows with the square of the subject's hippocampal rate relative to the AD
  mean (MMSE ~2.5 points/year, CDR-SB ~1.6 at -4.7 %/year), 1.5 x faster after conversion.
  """
  if years == 0:
    return baseline.mmse, baseline.cdrsb
  pace = (baseline.rates['hippocampus'] / 4.7) ** 2
  before, after = min(years, conversion_years), max(0.0, years - conversion_years)
  elapsed = before + 1.5 * after
  mmse = int(np.clip(round(baseline.mmse - 2.5 * pace * elapsed + rng.normal(0, 0.7)), 0, 30))
  cdrsb = float(np.clip(_round_half(baseline.cdrsb + 1.6 * pace * elapsed + rng.normal(0, 0.3)),
                        0.0, 18.0)) + 0.0
  return mmse, cdrsb
