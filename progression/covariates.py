"""Clinical covariates: one schema, validation, normalisation and the model's encoding.

Every module that feeds covariates to the generator uses `encode` / `encode_many`
and the layout constants below; nobody re-derives the order.

Fields (`FIELDS`, all optional; None = missing):

| field           | type  | unit / values                                  |
|-----------------|-------|------------------------------------------------|
| age_years       | float | years at the visit, 0-120                      |
| sex             | str   | 'F' or 'M'                                     |
| diagnosis       | str   | 'CN', 'MCI' or 'AD'                            |
| mmse            | float | Mini-Mental State Examination points, 0-30     |
| cdrsb           | float | CDR sum of boxes points, 0-18                  |
| apoe4           | int   | number of APOE e4 alleles, 0/1/2               |
| education_years | float | years of education, 0-30                       |

Encoded vector (`encode`, float32 `[ENCODED_DIM]` = `[16]`):

| index | name (`FEATURES`) | value                                              |
|-------|-------------------|----------------------------------------------------|
| 0     | age_z             | (age_years - age_mean) / age_std                   |
| 1     | sex_male          | F -> 0, M -> 1                                     |
| 2     | diagnosis_CN      | one-hot of diagnosis (all 0 when missing)          |
| 3     | diagnosis_MCI     |                                                    |
| 4     | diagnosis_AD      |                                                    |
| 5     | mmse_over_30      | mmse / 30                                          |
| 6     | cdrsb_over_18     | cdrsb / 18                                         |
| 7     | apoe4_over_2      | apoe4 / 2                                          |
| 8     | education_z       | (education_years - education_mean) / education_std |
| 9-15  | <field>_missing   | 1 when the field is missing, in `FIELDS` order     |

A missing field encodes its value slot(s) as 0 and its mask bit as 1.
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from progression.errors import ProgressionError

FIELDS = ('age_years', 'sex', 'diagnosis', 'mmse', 'cdrsb', 'apoe4', 'education_years')
SEXES = ('F', 'M')
DIAGNOSES = ('CN', 'MCI', 'AD')

VALUE_FEATURES = ('age_z', 'sex_male', 'diagnosis_CN', 'diagnosis_MCI', 'diagnosis_AD',
                  'mmse_over_30', 'cdrsb_over_18', 'apoe4_over_2', 'education_z')
MASK_OFFSET = len(VALUE_FEATURES)  # index of the first missing-mask bit (9)
FEATURES = VALUE_FEATURES + tuple(f'{field}_missing' for field in FIELDS)
ENCODED_DIM = len(FEATURES)  # 16
MASK_SLICE = slice(MASK_OFFSET, ENCODED_DIM)

# Spreads below this are treated as this (a tiny or single-age training split), so
# z-scores stay on the scale of years instead of exploding.
MIN_STD_YEARS = 1.0
# Used only when the training split has no value at all for the field.
FALLBACK_AGE_YEARS = (70.0, 10.0)        # (mean, std)
FALLBACK_EDUCATION_YEARS = (14.0, 3.0)   # (mean, std)

_MISSING_STRINGS = frozenset({'', 'na', 'nan', 'n/a', 'none', 'null'})
_SEX_ALIASES = {'f': 'F', 'female': 'F', 'm': 'M', 'male': 'M'}
# ADNI spellings: ADNIMERGE DX says 'Dementia'; DX_bl says SMC (significant memory
# concern, cognitively normal by ADNI criteria), EMCI/LMCI (early/late MCI).
_DIAGNOSIS_ALIASES = {'CN': 'CN', 'SMC': 'CN', 'MCI': 'MCI', 'EMCI': 'MCI', 'LMCI': 'MCI',
                      'AD': 'AD', 'DEMENTIA': 'AD'}
_RANGES = {'age_years': (0.0, 120.0), 'mmse': (0.0, 30.0), 'cdrsb': (0.0, 18.0),
           'education_years': (0.0, 30.0)}


@dataclasses.dataclass(frozen=True)
class Covariates:
  """Clinical covariates of one visit (None = missing). Build with `parse_covariates`.

  Attributes:
    age_years: age at the visit in years.
    sex: 'F' or 'M'.
    diagnosis: 'CN', 'MCI' or 'AD'.
    mmse: MMSE score (0-30 points).
    cdrsb: CDR sum of boxes (0-18 points).
    apoe4: number of APOE e4 alleles (0, 1 or 2).
    education_years: years of education.
  """
  age_years: float | None = None
  sex: str | None = None
  diagnosis: str | None = None
  mmse: float | None = None
  cdrsb: float | None = None
  apoe4: int | None = None
  education_years: float | None = None


def is_missing(value: Any) -> bool:
  """True for None, NaN, pandas NA and strings such as '', 'NA', 'nan', 'n/a'."""
  if isinstance(value, str):
    return value.strip().lower() in _MISSING_STRINGS
  return value is None or (np.ndim(value) == 0 and bool(pd.isna(value)))


def parse_covariates(raw: Mapping[str, Any], where: str) -> Covariates:
  """Validates raw covariate values (strings, numbers, NaN, '') into `Covariates`.

  Args:
    raw: field name (see `FIELDS`) -> raw value; absent fields are missing.
    where: location put in error messages, e.g. "participants.tsv row 3 subject
      sub-001 session ses-M012".

  Raises:
    ProgressionError: naming `where`, the field and the bad value, for unknown
      fields, unparsable values and values out of range.
  """
  unknown = sorted(set(raw) - set(FIELDS))
  if unknown:
    raise ProgressionError(f'{where}: unknown covariate field(s) {unknown}; '
                           f'expected some of {list(FIELDS)}')
  values = {}
  for field in FIELDS:
    value = raw.get(field)
    values[field] = None if is_missing(value) else _PARSERS[field](field, value, where)
  return Covariates(**values)


def covariates_to_dict(cov: Covariates) -> dict[str, Any]:
  """JSON-friendly dict of all `FIELDS` (None for missing)."""
  return {field: getattr(cov, field) for field in FIELDS}


def covariates_from_dict(raw: Mapping[str, Any], where: str = 'covariates') -> Covariates:
  """Inverse of `covariates_to_dict` (validated, as `parse_covariates`)."""
  return parse_covariates(raw, where)


def _bad(field: str, value: Any, where: str, expected: str) -> ProgressionError:
  return ProgressionError(f'{where}: field {field} has bad value {value!r} (expected {expected})')


def _number(field: str, value: Any, where: str, expected: str) -> float:
  if isinstance(value, (bool, np.bool_)):
    raise _bad(field, value, where, expected)
  try:
    number = float(value.strip() if isinstance(value, str) else value)
  except (TypeError, ValueError):
    raise _bad(field, value, where, expected) from None
  if not math.isfinite(number):
    raise _bad(field, value, where, expected)
  return number


def _bounded(field: str, value: Any, where: str) -> float:
  low, high = _RANGES[field]
  expected = f'a number in [{low:g}, {high:g}]'
  number = _number(field, value, where, expected)
  if not low <= number <= high:
    raise _bad(field, value, where, expected)
  return number


def _apoe4(field: str, value: Any, where: str) -> int:
  expected = 'an e4 allele count 0, 1 or 2'
  number = _number(field, value, where, expected)
  if number not in (0.0, 1.0, 2.0):
    raise _bad(field, value, where, expected)
  return int(number)


def _sex(field: str, value: Any, where: str) -> str:
  expected = "'F' or 'M' (or female/male); map numeric codes in the cohort spec"
  if not isinstance(value, str) or value.strip().lower() not in _SEX_ALIASES:
    raise _bad(field, value, where, expected)
  return _SEX_ALIASES[value.strip().lower()]


def _diagnosis(field: str, value: Any, where: str) -> str:
  expected = 'CN, MCI or AD (also Dementia, SMC, EMCI, LMCI)'
  if not isinstance(value, str) or value.strip().upper() not in _DIAGNOSIS_ALIASES:
    raise _bad(field, value, where, expected)
  return _DIAGNOSIS_ALIASES[value.strip().upper()]


_PARSERS = {'age_years': _bounded, 'sex': _sex, 'diagnosis': _diagnosis, 'mmse': _bounded,
            'cdrsb': _bounded, 'apoe4': _apoe4, 'education_years': _bounded}


@dataclasses.dataclass(frozen=True)
class CovariateNormalizer:
  """Z-scoring statistics fitted on the training split (all in years)."""
  age_mean: float
  age_std: float
  education_mean: float
  education_std: float

  def to_dict(self) -> dict[str, float]:
    """Plain floats, for JSON checkpoint metadata."""
    return {k: float(v) for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> 'CovariateNormalizer':
    """Inverse of `to_dict`; raises ProgressionError on missing keys or bad values."""
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in data]
    if missing:
      raise ProgressionError(f'covariate normalizer: missing key(s) {missing} in {dict(data)}')
    values = {n: _number(n, data[n], 'covariate normalizer', 'a finite number') for n in names}
    for n in ('age_std', 'education_std'):
      if values[n] <= 0:
        raise _bad(n, data[n], 'covariate normalizer', 'a positive number')
    return cls(**values)


def fit_normalizer(covs: Sequence[Covariates]) -> CovariateNormalizer:
  """Fits age and education z-scoring on the TRAINING split's covariates.

  Means and (population) standard deviations ignore missing values; spreads
  below `MIN_STD_YEARS` are raised to it; a field with no value at all falls back
  to `FALLBACK_AGE_YEARS` / `FALLBACK_EDUCATION_YEARS`.
  """
  if len(covs) == 0:
    raise ProgressionError('fit_normalizer: no covariates given (empty training split?)')
  age_mean, age_std = _mean_std([c.age_years for c in covs], FALLBACK_AGE_YEARS)
  edu_mean, edu_std = _mean_std([c.education_years for c in covs], FALLBACK_EDUCATION_YEARS)
  return CovariateNormalizer(age_mean, age_std, edu_mean, edu_std)


def _mean_std(values: Sequence[float | None],
              fallback: tuple[float, float]) -> tuple[float, float]:
  present = np.array([v for v in values if v is not None], dtype=np.float64)
  if present.size == 0:
    return fallback
  return float(present.mean()), max(float(present.std()), MIN_STD_YEARS)


def encode(cov: Covariates, normalizer: CovariateNormalizer) -> np.ndarray:
  """Encodes one visit's covariates as float32 `[ENCODED_DIM]` (layout: module docstring)."""
  out = np.zeros(ENCODED_DIM, dtype=np.float32)
  if cov.age_years is not None:
    out[0] = (cov.age_years - normalizer.age_mean) / normalizer.age_std
  if cov.sex is not None:
    out[1] = _index(SEXES, cov.sex, 'sex')
  if cov.diagnosis is not None:
    out[2 + _index(DIAGNOSES, cov.diagnosis, 'diagnosis')] = 1.0
  if cov.mmse is not None:
    out[5] = cov.mmse / 30.0
  if cov.cdrsb is not None:
    out[6] = cov.cdrsb / 18.0
  if cov.apoe4 is not None:
    out[7] = cov.apoe4 / 2.0
  if cov.education_years is not None:
    out[8] = (cov.education_years - normalizer.education_mean) / normalizer.education_std
  for i, field in enumerate(FIELDS):
    out[MASK_OFFSET + i] = float(getattr(cov, field) is None)
  return out


def encode_many(covs: Sequence[Covariates], normalizer: CovariateNormalizer) -> np.ndarray:
  """Encodes N visits as float32 `[N, ENCODED_DIM]`."""
  if len(covs) == 0:
    return np.zeros((0, ENCODED_DIM), dtype=np.float32)
  return np.stack([encode(c, normalizer) for c in covs])


def _index(options: tuple[str, ...], value: str, field: str) -> int:
  if value not in options:
    raise ProgressionError(f'covariates: field {field} has bad value {value!r} '
                           f'(expected one of {options}; build Covariates with parse_covariates)')
  return options.index(value)
