"""Tests for progression.covariates: parsing, validation, normalisation and encoding."""

import json
import math

import numpy as np
import pytest

from progression import covariates as cv
from progression.errors import ProgressionError

WHERE = 'participants.tsv row 3 subject sub-001 session ses-M012'


def test_parse_accepts_strings_numbers_and_aliases():
  cov = cv.parse_covariates({'age_years': ' 71.5', 'sex': 'female', 'diagnosis': 'Dementia',
                             'mmse': 27, 'cdrsb': '1.5', 'apoe4': '1.0',
                             'education_years': np.float64(16)}, WHERE)
  assert cov == cv.Covariates(age_years=71.5, sex='F', diagnosis='AD', mmse=27.0, cdrsb=1.5,
                              apoe4=1, education_years=16.0)
  assert isinstance(cov.apoe4, int)
  assert cv.parse_covariates({'sex': 'Male', 'diagnosis': 'lmci'}, WHERE).sex == 'M'
  assert cv.parse_covariates({'diagnosis': 'EMCI'}, WHERE).diagnosis == 'MCI'
  assert cv.parse_covariates({'diagnosis': 'cn'}, WHERE).diagnosis == 'CN'


@pytest.mark.parametrize('missing', [None, float('nan'), '', '  ', 'NA', 'nan', 'n/a'])
def test_parse_missing_values(missing):
  cov = cv.parse_covariates({field: missing for field in cv.FIELDS}, WHERE)
  assert cov == cv.Covariates()


@pytest.mark.parametrize('field,value', [
    ('age_years', 130), ('age_years', -1), ('age_years', 'old'), ('age_years', float('inf')),
    ('sex', 'X'), ('sex', 1), ('diagnosis', 'FTD'), ('mmse', 31), ('mmse', '-4'),
    ('cdrsb', 18.5), ('apoe4', 3), ('apoe4', '1.5'), ('apoe4', True), ('education_years', 31),
])
def test_parse_rejects_bad_values_naming_where_field_and_value(field, value):
  with pytest.raises(ProgressionError) as err:
    cv.parse_covariates({field: value}, WHERE)
  message = str(err.value)
  assert WHERE in message and field in message and repr(value) in message


def test_parse_rejects_unknown_field():
  with pytest.raises(ProgressionError, match='unknown covariate field.*age'):
    cv.parse_covariates({'age': 70}, WHERE)


def test_fit_normalizer_known_answer_ignores_missing():
  covs = [cv.Covariates(age_years=60.0, education_years=12.0),
          cv.Covariates(age_years=70.0), cv.Covariates(age_years=80.0, education_years=16.0),
          cv.Covariates()]
  norm = cv.fit_normalizer(covs)
  assert norm.age_mean == pytest.approx(70.0)
  assert norm.age_std == pytest.approx(math.sqrt(200.0 / 3.0))
  assert norm.education_mean == pytest.approx(14.0)
  assert norm.education_std == pytest.approx(2.0)


def test_fit_normalizer_std_floor_and_fallback():
  norm = cv.fit_normalizer([cv.Covariates(age_years=70.0), cv.Covariates(age_years=70.2)])
  assert norm.age_std == cv.MIN_STD_YEARS
  assert (norm.education_mean, norm.education_std) == cv.FALLBACK_EDUCATION_YEARS
  with pytest.raises(ProgressionError, match='empty training split'):
    cv.fit_normalizer([])


def test_normalizer_dict_round_trip_through_json():
  norm = cv.CovariateNormalizer(71.0, 7.5, 15.0, 2.5)
  assert cv.CovariateNormalizer.from_dict(json.loads(json.dumps(norm.to_dict()))) == norm
  with pytest.raises(ProgressionError, match='education_std'):
    cv.CovariateNormalizer.from_dict({'age_mean': 1, 'age_std': 1, 'education_mean': 1})
  with pytest.raises(ProgressionError, match='age_std'):
    cv.CovariateNormalizer.from_dict({'age_mean': 1, 'age_std': 0, 'education_mean': 1,
                                      'education_std': 1})


def test_layout_constants():
  assert cv.ENCODED_DIM == 16 == len(cv.FEATURES)
  assert cv.MASK_OFFSET == 9
  assert cv.FEATURES[cv.MASK_OFFSET + cv.FIELDS.index('mmse')] == 'mmse_missing'


def test_encode_known_answer():
  norm = cv.CovariateNormalizer(age_mean=70.0, age_std=5.0, education_mean=14.0,
                                education_std=2.0)
  cov = cv.Covariates(age_years=75.0, sex='M', diagnosis='MCI', mmse=24.0, cdrsb=4.5,
                      apoe4=1, education_years=10.0)
  expected = [1.0, 1.0, 0.0, 1.0, 0.0, 0.8, 0.25, 0.5, -2.0] + [0.0] * 7
  np.testing.assert_allclose(cv.encode(cov, norm), expected, rtol=1e-6)
  assert cv.encode(cov, norm).dtype == np.float32


def test_encode_missing_sets_zero_and_mask():
  norm = cv.CovariateNormalizer(70.0, 5.0, 14.0, 2.0)
  out = cv.encode(cv.Covariates(sex='F', apoe4=2), norm)
  expected = np.zeros(16)
  expected[7] = 1.0                                   # apoe4 / 2; sex F encodes as 0
  missing = [f for f in cv.FIELDS if f not in ('sex', 'apoe4')]
  expected[[cv.MASK_OFFSET + cv.FIELDS.index(f) for f in missing]] = 1.0
  np.testing.assert_array_equal(out, expected)


def test_encode_many_shapes_and_rejects_unparsed_values():
  norm = cv.CovariateNormalizer(70.0, 5.0, 14.0, 2.0)
  covs = [cv.Covariates(age_years=70.0), cv.Covariates(diagnosis='AD')]
  out = cv.encode_many(covs, norm)
  assert out.shape == (2, cv.ENCODED_DIM) and out.dtype == np.float32
  np.testing.assert_array_equal(out[1], cv.encode(covs[1], norm))
  assert cv.encode_many([], norm).shape == (0, cv.ENCODED_DIM)
  with pytest.raises(ProgressionError, match='sex'):
    cv.encode(cv.Covariates(sex='male'), norm)


def test_covariates_dict_round_trip():
  cov = cv.Covariates(age_years=70.0, sex='F', diagnosis='CN', apoe4=0)
  data = json.loads(json.dumps(cv.covariates_to_dict(cov)))
  assert list(data) == list(cv.FIELDS) and data['mmse'] is None
  assert cv.covariates_from_dict(data) == cov
