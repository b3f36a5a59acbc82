"""Tests for progression.cohort: every shipped spec on tiny fake trees, pairs, splits, errors."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from progression import cohort
from progression.covariates import Covariates
from progression.errors import ProgressionError

DAYS = 365.25


def write_table(path: Path, header: list[str], rows: list[list], sep: str = '\t') -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  lines = [sep.join(header)] + [sep.join(str(v) for v in row) for row in rows]
  path.write_text('\n'.join(lines) + '\n')
  return path


def touch(path: Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(b'')  # read_visits only checks existence


# ----------------------------------------------------------------------------- synthetic (BIDS)

PARTICIPANTS = ['participant_id', 'sex', 'education_level', 'apoe4']
SESSIONS = ['session_id', 'age', 'diagnosis', 'MMSE', 'cdr_sb']
SYNTHETIC_SESSIONS = {
    'sub-001': [['ses-M000', 70.0, 'CN', 29, 0.0], ['ses-M012', 71.0, 'CN', 29, 0.5],
                ['ses-M024', 72.0, 'MCI', 27, 1.5]],
    'sub-002': [['ses-M000', 80.5, 'AD', 20, 6.0], ['ses-M006', 81.0, 'AD', 18, 7.0]],
    'sub-003': [['ses-M006', 65.0, 'MCI', 26, 2.0], ['ses-M018', 66.0, 'Dementia', 22, 4.0]],
    'sub-004': [['ses-M000', 75.0, 'CN', 30, 0.0]],
}


def make_bids(root: Path, sessions=None, participants=None, labels=True,
              sessions_header=SESSIONS) -> Path:
  sessions = SYNTHETIC_SESSIONS if sessions is None else sessions
  participants = participants or [[s, 'F' if i % 2 else 'M', 12 + i, i % 3]
                                  for i, s in enumerate(sessions)]
  write_table(root / 'participants.tsv', PARTICIPANTS, participants)
  for subject, rows in sessions.items():
    write_table(root / subject / f'{subject}_sessions.tsv', sessions_header, rows)
    for row in rows:
      anat = root / subject / row[0] / 'anat'
      touch(anat / f'{subject}_{row[0]}_T1w.nii.gz')
      if labels:
        touch(anat / f'{subject}_{row[0]}_dseg.nii.gz')
  return root


def test_synthetic_visits_and_pairs(tmp_path):
  root = make_bids(tmp_path)
  visits, pairs = cohort.load_cohort('synthetic', root)
  assert list(visits.columns) == list(cohort.VISIT_COLUMNS)
  assert len(visits) == 8
  assert visits.subject.tolist() == ['sub-001'] * 3 + ['sub-002'] * 2 + ['sub-003'] * 2 + [
      'sub-004']
  np.testing.assert_allclose(visits.years_from_first, [0, 1, 2, 0, 0.5, 0, 1, 0])
  first = visits.iloc[0]
  expected = root.resolve() / 'sub-001/ses-M000/anat/sub-001_ses-M000_T1w.nii.gz'
  assert first.image_path == str(expected)
  assert first.labels_path.endswith('sub-001_ses-M000_dseg.nii.gz')
  assert (first.sex, first.education_years, first.apoe4, first.mmse) == ('M', 12.0, 0.0, 29.0)
  assert visits.diagnosis.tolist()[6] == 'AD'                        # Dementia -> AD

  assert list(pairs.columns) == list(cohort.PAIR_COLUMNS)
  assert len(pairs) == 3 + 1 + 1                                     # C(3,2) + 1 + 1 + 0
  np.testing.assert_allclose(pairs.interval_years, [1, 2, 1, 0.5, 1])
  assert set(visits.time_source) == {'session_id'} and set(pairs.interval_source) == {'session_id'}
  assert pairs.baseline_session.tolist()[:3] == ['ses-M000', 'ses-M000', 'ses-M012']
  assert pairs.followup_session.tolist()[:3] == ['ses-M012', 'ses-M024', 'ses-M024']
  row = pairs.iloc[1]                                  # sub-001 M000 -> M024
  assert (row.age_years, row.diagnosis, row.followup_diagnosis) == (70.0, 'CN', 'MCI')
  assert row.followup_labels.endswith('sub-001_ses-M024_dseg.nii.gz')
  assert cohort.covariates_of(row) == Covariates(70.0, 'M', 'CN', 29.0, 0.0, 0, 12.0)
  assert cohort.covariates_of(visits.iloc[6]).diagnosis == 'AD'


def test_synthetic_missing_image_names_path_and_visit(tmp_path):
  root = make_bids(tmp_path)
  image = root / 'sub-002/ses-M006/anat/sub-002_ses-M006_T1w.nii.gz'
  image.unlink()
  with pytest.raises(ProgressionError, match='sub-002 session ses-M006: image file not found'
                     ) as err:
    cohort.read_visits(cohort.load_spec('synthetic'), root)
  assert str(image) in str(err.value)


def test_synthetic_requires_labels(tmp_path):
  root = make_bids(tmp_path, labels=False)
  with pytest.raises(ProgressionError, match='label map not found'):
    cohort.read_visits(cohort.load_spec('synthetic'), root)


def test_missing_required_column_lists_available(tmp_path):
  header = ['session_id', 'age', 'diagnosis', 'mmse_score', 'cdr_sb']
  root = make_bids(tmp_path, sessions_header=header)
  with pytest.raises(ProgressionError) as err:
    cohort.read_visits(cohort.load_spec('synthetic'), root)
  message = str(err.value)
  assert 'sub-001_sessions.tsv' in message and "'MMSE'" in message
  assert "available columns: ['session_id', 'age', 'diagnosis', 'mmse_score', 'cdr_sb']" in message


def test_bad_covariate_names_file_row_subject_session_field(tmp_path):
  sessions = {'sub-001': [['ses-M000', 70, 'CN', 29, 0], ['ses-M012', 71, 'CN', 31, 0]]}
  root = make_bids(tmp_path, sessions=sessions)
  with pytest.raises(ProgressionError) as err:
    cohort.read_visits(cohort.load_spec('synthetic'), root)
  message = str(err.value)
  assert 'sub-001_sessions.tsv row 2 subject sub-001 session ses-M012' in message
  assert 'mmse' in message and "'31'" in message


@pytest.mark.parametrize('second,match', [('ses-M012', 'same subject and session'),
                                          ('ses-M12', 'same subject and date')])
def test_duplicate_visits(tmp_path, second, match):
  sessions = {'sub-001': [['ses-M000', 70, 'CN', 29, 0], ['ses-M012', 71, 'CN', 29, 0],
                          [second, 71, 'CN', 29, 0]]}
  root = make_bids(tmp_path, sessions=sessions)
  with pytest.raises(ProgressionError, match=f'row 3 subject sub-001.*{match}'):
    cohort.read_visits(cohort.load_spec('synthetic'), root)


def test_age_falling_while_time_grows_names_row_session_and_field(tmp_path):
  # Rows out of time order on purpose: the check follows the session time, not the row order.
  sessions = {'sub-001': [['ses-M024', 69.5, 'CN', 29, 0], ['ses-M000', 70, 'CN', 29, 0],
                          ['ses-M012', 71, 'CN', 29, 0]]}
  root = make_bids(tmp_path, sessions=sessions)
  with pytest.raises(ProgressionError,
                     match=r'sub-001_sessions.tsv row 1 subject sub-001 session ses-M024: '
                           r'field age: .*69.50 y is below 71.00 y at the earlier session '
                           r'ses-M012'):
    cohort.read_visits(cohort.load_spec('synthetic'), root)
  # The same ages in time order load; a missing age is not compared.
  sessions['sub-001'][0][1] = 72.0
  sessions['sub-001'][2][1] = 'n/a'
  visits = cohort.read_visits(cohort.load_spec('synthetic'), make_bids(tmp_path / 'ok', sessions))
  assert visits.age_years.tolist()[::2] == [70.0, 72.0]


def test_bad_session_code_and_missing_sessions_file(tmp_path):
  root = make_bids(tmp_path / 'a', sessions={'sub-001': [['ses-baseline', 70, 'CN', 29, 0]]})
  with pytest.raises(ProgressionError, match="session id 'ses-baseline' does not match"):
    cohort.read_visits(cohort.load_spec('synthetic'), root)
  root = make_bids(tmp_path / 'b')
  (root / 'sub-003/sub-003_sessions.tsv').unlink()
  with pytest.raises(ProgressionError, match='sub-003_sessions.tsv: file not found'):
    cohort.read_visits(cohort.load_spec('synthetic'), root)


def test_duplicate_participant(tmp_path):
  root = make_bids(tmp_path, participants=[['sub-001', 'F', 12, 0], ['sub-001', 'M', 12, 0]],
                   sessions={'sub-001': [['ses-M000', 70, 'CN', 29, 0]]})
  with pytest.raises(ProgressionError, match=r"participants.tsv row 2.*'sub-001' \(also row 1\)"):
    cohort.read_visits(cohort.load_spec('synthetic'), root)


# ----------------------------------------------------------------------------- Clinica BIDS

def test_clinica_optional_columns_and_labels(tmp_path):
  sessions = {'sub-ADNI011S0002': [['ses-M000', 'CN'], ['ses-M006', 'MCI']],
              'sub-ADNI011S0003': [['ses-M00', 'AD'], ['ses-M12', 'AD']]}
  write_table(tmp_path / 'participants.tsv', ['participant_id', 'sex'],
              [['sub-ADNI011S0002', 'M'], ['sub-ADNI011S0003', 'F']])
  for subject, rows in sessions.items():
    write_table(tmp_path / subject / f'{subject}_sessions.tsv', ['session_id', 'diagnosis'], rows)
    for session, _ in rows:
      touch(tmp_path / subject / session / 'anat' / f'{subject}_{session}_T1w.nii.gz')
  touch(tmp_path / 'sub-ADNI011S0002/ses-M006/anat/sub-ADNI011S0002_ses-M006_dseg.nii.gz')
  visits, pairs = cohort.load_cohort('clinica_bids', tmp_path)
  assert len(visits) == 4 and len(pairs) == 2
  assert visits.age_years.isna().all() and visits.mmse.isna().all() and visits.apoe4.isna().all()
  assert visits.labels_path[0] is None and visits.labels_path[2] is None
  assert visits.labels_path[1].endswith('sub-ADNI011S0002_ses-M006_dseg.nii.gz')
  np.testing.assert_allclose(pairs.interval_years, [0.5, 1.0])
  assert cohort.covariates_of(pairs.iloc[0]) == Covariates(sex='M', diagnosis='CN')

  spec_path = tmp_path / 'no_labels.toml'
  text = Path(cohort.load_spec('clinica_bids').path).read_text()
  spec_path.write_text(text.replace('labels = "{subject}', '# labels = "'))
  spec = cohort.load_spec(spec_path)
  assert spec.labels is None
  assert cohort.read_visits(spec, tmp_path).labels_path.isna().all()


def clinica_spec_without_exam_dates(tmp_path: Path) -> Path:
  path = tmp_path / 'clinica_no_dates.toml'
  text = Path(cohort.load_spec('clinica_bids').path).read_text()
  assert 'exam_date_column = "examination_date"' in text  # on in the shipped spec
  path.write_text(text.replace('exam_date_column', '# exam_date_column'))
  return path


def test_clinica_exam_dates_override_nominal_session_months(tmp_path, caplog):
  root = tmp_path / 'bids'
  sessions = {'sub-01': [['ses-M000', '2012-05-02'], ['ses-M012', '2013-06-17'],
                         ['ses-M024', '2014-05-20']],
              'sub-02': [['ses-M000', '2015-01-01'], ['ses-M006', '']]}  # a date is missing
  write_table(root / 'participants.tsv', ['participant_id'], [[s] for s in sessions])
  for subject, rows in sessions.items():
    write_table(root / subject / f'{subject}_sessions.tsv', ['session_id', 'examination_date'],
                rows)
    for session, _ in rows:
      touch(root / subject / session / 'anat' / f'{subject}_{session}_T1w.nii.gz')
  spec = cohort.load_spec('clinica_bids')
  assert spec.time.exam_date_column == 'examination_date'
  with caplog.at_level('WARNING'):
    visits = cohort.read_visits(spec, root)
  pairs = cohort.make_pairs(visits)
  first = pd.Timestamp('2012-05-02')
  days = [(pd.Timestamp(d) - first).days for d in ('2013-06-17', '2014-05-20')]
  np.testing.assert_allclose(pairs.interval_years[:3], [days[0] / DAYS, days[1] / DAYS,
                                                        (days[1] - days[0]) / DAYS])
  assert pairs.interval_source.tolist() == ['exam_date'] * 3 + ['session_id']
  assert pairs.interval_years[3] == 0.5                                # sub-02: nominal months
  assert visits.time_source.tolist() == ['exam_date'] * 3 + ['session_id'] * 2
  assert any('1 subject(s) lack an exam date (column examination_date)' in r.getMessage()
             and 'sub-02_sessions.tsv row 2' in r.getMessage() for r in caplog.records)
  # Without exam_date_column the same tree is read from the session ids alone.
  spec = cohort.load_spec(clinica_spec_without_exam_dates(tmp_path))
  nominal = cohort.make_pairs(cohort.read_visits(spec, root))
  np.testing.assert_allclose(nominal.interval_years, [1, 2, 1, 0.5])
  assert set(nominal.interval_source) == {'session_id'}


@pytest.mark.parametrize('date,match', [
    ('2013/06/17', "row 2 subject sub-01 session ses-M012: column examination_date has bad "
                   "date '2013/06/17' \\(expected format %Y-%m-%d\\)"),
    ('2012-05-02', 'row 2 subject sub-01 session ses-M012: duplicate visit \\(same subject and '
                   'exam date as .*row 1 subject sub-01 session ses-M000\\)')])
def test_clinica_bad_exam_date_names_row_and_field(tmp_path, date, match):
  root = tmp_path / 'bids'
  write_table(root / 'participants.tsv', ['participant_id'], [['sub-01']])
  write_table(root / 'sub-01' / 'sub-01_sessions.tsv', ['session_id', 'examination_date'],
              [['ses-M000', '2012-05-02'], ['ses-M012', date]])
  for session in ('ses-M000', 'ses-M012'):
    touch(root / 'sub-01' / session / 'anat' / f'sub-01_{session}_T1w.nii.gz')
  with pytest.raises(ProgressionError, match=match):
    cohort.read_visits(cohort.load_spec('clinica_bids'), root)


def test_clinica_missing_required_id_column(tmp_path):
  write_table(tmp_path / 'participants.tsv', ['subject', 'sex'], [['sub-01', 'M']])
  with pytest.raises(ProgressionError, match=r"participants.tsv: column 'participant_id'.*"
                     r"available columns: \['subject', 'sex'\]"):
    cohort.read_visits(cohort.load_spec('clinica_bids'), tmp_path)


# ----------------------------------------------------------------------------- ADNIMERGE

ADNI_HEADER = ['RID', 'PTID', 'VISCODE', 'EXAMDATE', 'AGE', 'PTGENDER', 'PTEDUCAT', 'APOE4', 'DX',
               'MMSE', 'CDRSB']
ADNI_ROWS = [
    [2, '011_S_0002', 'bl', '2010-01-01', 70.0, 'Male', 16, 0, 'CN', 29, 0],
    [2, '011_S_0002', 'm06', '2010-07-02', 70.0, 'Male', 16, 0, 'MCI', 28, 0.5],
    [2, '011_S_0002', 'm12', '2011-01-01', 70.0, 'Male', 16, 0, 'Dementia', 24, 3],
    [3, '011_S_0003', 'm24', '2014-03-01', 80.0, 'Female', 12, 2, 'MCI', 26, 2],
    [3, '011_S_0003', 'bl', '2012-03-01', 80.0, 'Female', 12, 2, '', '', ''],
]


def make_adni(root: Path, rows=ADNI_ROWS, header=ADNI_HEADER, images=True) -> Path:
  write_table(root / 'ADNIMERGE.csv', header, rows, sep=',')
  for row in rows:
    if images:
      touch(root / 'images' / row[1] / row[2] / 'T1w.nii.gz')
  return root


def test_adnimerge_age_at_visit_and_intervals(tmp_path):
  visits, pairs = cohort.load_cohort('adnimerge', make_adni(tmp_path))
  assert visits.session.tolist() == ['bl', 'm06', 'm12', 'bl', 'm24']
  np.testing.assert_allclose(visits.years_from_first,
                             [0, 182 / DAYS, 365 / DAYS, 0, 730 / DAYS])
  np.testing.assert_allclose(visits.age_years,
                             [70, 70 + 182 / DAYS, 70 + 365 / DAYS, 80, 80 + 730 / DAYS])
  assert visits.diagnosis.tolist() == ['CN', 'MCI', 'AD', None, 'MCI']
  assert visits.sex.tolist() == ['M', 'M', 'M', 'F', 'F']
  assert np.isnan(visits.mmse[3]) and visits.apoe4[3] == 2.0
  assert visits.labels_path.isna().all()
  assert len(pairs) == 3 + 1
  np.testing.assert_allclose(pairs.interval_years,
                             [182 / DAYS, 365 / DAYS, 183 / DAYS, 730 / DAYS])
  assert set(pairs.interval_source) == {'exam_date'}
  assert pairs.followup_diagnosis.tolist() == ['MCI', 'AD', 'AD', 'MCI']


def test_adnimerge_intervals_follow_exam_dates_not_viscode_months(tmp_path):
  # The m12 visit took place 13.5 months after bl, m24 ~22 months after: the intervals are the
  # days between the EXAMDATEs / 365.25, not the nominal 1 and 2 years of the VISCODEs.
  rows = [[5, '022_S_0005', 'bl', '2010-01-15', 72.0, 'Female', 14, 1, 'MCI', 27, 1.0],
          [5, '022_S_0005', 'm12', '2011-03-02', 72.0, 'Female', 14, 1, 'MCI', 26, 1.5],
          [5, '022_S_0005', 'm24', '2011-11-15', 72.0, 'Female', 14, 1, 'AD', 24, 3.0]]
  visits, pairs = cohort.load_cohort('adnimerge', make_adni(tmp_path, rows=rows))
  days_m12 = (pd.Timestamp('2011-03-02') - pd.Timestamp('2010-01-15')).days   # 411
  days_m24 = (pd.Timestamp('2011-11-15') - pd.Timestamp('2010-01-15')).days   # 669
  np.testing.assert_allclose(pairs.interval_years, [days_m12 / DAYS, days_m24 / DAYS,
                                                    (days_m24 - days_m12) / DAYS], rtol=1e-12)
  assert abs(pairs.interval_years[0] - 13.5 / 12) < 1e-3
  assert pairs.interval_source.tolist() == ['exam_date'] * 3
  assert visits.time_source.tolist() == ['exam_date'] * 3
  np.testing.assert_allclose(visits.age_years, 72.0 + np.array([0, days_m12, days_m24]) / DAYS)


def test_adnimerge_examdate_bl_column_and_skipped_images(tmp_path):
  header = ADNI_HEADER + ['EXAMDATE_bl']
  rows = [r + ['2009-12-31' if r[1] == '011_S_0002' else '2012-03-01'] for r in ADNI_ROWS]
  root = make_adni(tmp_path, rows=rows, header=header)
  (root / 'images/011_S_0002/bl/T1w.nii.gz').unlink()
  spec_path = tmp_path / 'skip.toml'
  spec_path.write_text(Path(cohort.load_spec('adnimerge').path).read_text().replace(
      'on_missing_image = "error"', 'on_missing_image = "skip"'))
  visits = cohort.read_visits(cohort.load_spec(spec_path), root)
  assert visits.session.tolist() == ['m06', 'm12', 'bl', 'm24']
  np.testing.assert_allclose(visits.years_from_first, [0, 183 / DAYS, 0, 730 / DAYS])
  np.testing.assert_allclose(visits.age_years[:2], [70 + 183 / DAYS, 70 + 366 / DAYS])


def test_adnimerge_age_needs_a_baseline(tmp_path):
  root = make_adni(tmp_path, rows=[r for r in ADNI_ROWS if r[2] != 'bl'])
  with pytest.raises(ProgressionError, match="row 1 subject 011_S_0002 session m06: cannot "
                     "compute age.*no 'bl' visit"):
    cohort.read_visits(cohort.load_spec('adnimerge'), root)


@pytest.mark.parametrize('change,match', [
    ((1, 3, '2010-01-01'), 'same subject and date'),
    ((1, 3, '2010/07/02'), "column EXAMDATE has bad date '2010/07/02'"),
    ((1, 8, 'Unknown'), "field diagnosis has bad value 'Unknown'"),
])
def test_adnimerge_bad_rows(tmp_path, change, match):
  rows = [list(r) for r in ADNI_ROWS]
  rows[change[0]][change[1]] = change[2]
  root = make_adni(tmp_path, rows=rows)
  with pytest.raises(ProgressionError, match=f'ADNIMERGE.csv row 2 subject 011_S_0002 session '
                     f'm06.*{match}'):
    cohort.read_visits(cohort.load_spec('adnimerge'), root)


def test_adnimerge_missing_column_lists_available(tmp_path):
  header = [h if h != 'CDRSB' else 'CDR_SB' for h in ADNI_HEADER]
  root = make_adni(tmp_path, header=header)
  with pytest.raises(ProgressionError, match=r"ADNIMERGE.csv: column 'CDRSB' \(field cdrsb.*"
                     r"available columns: \['RID', 'PTID'"):
    cohort.read_visits(cohort.load_spec('adnimerge'), root)


# ----------------------------------------------------------------------------- OASIS-3

OASIS_HEADER = ['OASISID', 'MR_session', 'AgeatEntry', 'GENDER', 'EDUC', 'APOE', 'dx', 'mmse',
                'cdrsum']


def make_oasis(root: Path, rows) -> Path:
  write_table(root / 'oasis3_mr_sessions.csv', OASIS_HEADER, rows, sep=',')
  for row in rows:
    days = row[1].rsplit('_d', 1)[1]
    touch(root / f'sub-{row[0]}/ses-d{days}/anat/sub-{row[0]}_ses-d{days}_T1w.nii.gz')
  return root


def test_oasis3_days_ages_genotype_and_sex_codes(tmp_path):
  rows = [['OAS30001', 'OAS30001_MR_d0129', 65.0, 2, 12, 34, 'CN', 30, 0],
          ['OAS30001', 'OAS30001_MR_d0500', 65.0, 2, 12, 34, 'CN', 29, 0.5],
          ['OAS30002', 'OAS30002_MR_d0000', 80.0, 1, 18, 44, 'AD', 20, 5],
          ['OAS30002', 'OAS30002_MR_d1096', 80.0, 1, 18, 44, '', '', '']]
  visits, pairs = cohort.load_cohort('oasis3', make_oasis(tmp_path, rows))
  np.testing.assert_allclose(visits.age_years,
                             [65 + 129 / DAYS, 65 + 500 / DAYS, 80, 80 + 1096 / DAYS])
  np.testing.assert_allclose(visits.years_from_first, [0, 371 / DAYS, 0, 1096 / DAYS])
  assert visits.sex.tolist() == ['F', 'F', 'M', 'M']
  assert visits.apoe4.tolist() == [1.0, 1.0, 2.0, 2.0]
  assert visits.image_path[1].endswith(
      'sub-OAS30001/ses-d0500/anat/sub-OAS30001_ses-d0500_T1w.nii.gz')
  np.testing.assert_allclose(pairs.interval_years, [371 / DAYS, 1096 / DAYS])
  assert pairs.interval_source.tolist() == ['session_id'] * 2  # d-numbers in the session ids


def test_oasis3_bad_genotype(tmp_path):
  root = make_oasis(tmp_path, [['OAS30001', 'OAS30001_MR_d0129', 65.0, 2, 12, 35, 'CN', 30, 0]])
  with pytest.raises(ProgressionError, match="row 1 subject OAS30001 .*field apoe4 has bad "
                     "value '35'"):
    cohort.read_visits(cohort.load_spec('oasis3'), root)


# ----------------------------------------------------------------------------- pairs and splits

def visits_frame(years):
  n = len(years)
  return pd.DataFrame({'subject': ['s1'] * n, 'session': [f'v{i}' for i in range(n)],
                       'age_years': 70.0, 'years_from_first': years,
                       'time_source': 'session_id', 'sex': 'F',
                       'diagnosis': 'CN', 'mmse': 29.0, 'cdrsb': 0.0, 'apoe4': 0.0,
                       'education_years': 12.0, 'image_path': 'x', 'labels_path': None})


def test_make_pairs_rejects_zero_interval_and_handles_empty():
  with pytest.raises(ProgressionError, match='follow-up session v1 is not after baseline '
                     'session v0'):
    cohort.make_pairs(visits_frame([0.0, 0.0]))
  assert len(cohort.make_pairs(visits_frame([0.0]))) == 0
  assert list(cohort.make_pairs(visits_frame([])).columns) == list(cohort.PAIR_COLUMNS)
  with pytest.raises(ProgressionError, match='lacks column'):
    cohort.make_pairs(visits_frame([0.0]).drop(columns='image_path'))


def test_split_subjects_properties():
  subjects = [f'sub-{i:03d}' for i in range(10)]
  split = cohort.split_subjects(subjects, seed=0)
  assert set(split) == set(subjects)
  assert [list(split.values()).count(s) for s in cohort.SPLITS] == [6, 2, 2]
  assert cohort.split_subjects(subjects[::-1] + subjects[:3], seed=0) == split
  assert cohort.split_subjects(subjects, seed=1) != split
  for n in range(3, 40):
    values = list(cohort.split_subjects([f's{i}' for i in range(n)], seed=n).values())
    assert len(values) == n and set(values) == set(cohort.SPLITS)
    assert abs(values.count('train') - 0.6 * n) <= 1
  assert cohort.split_subjects(['a']) == {'a': 'train'}
  with_zero = cohort.split_subjects(subjects, fractions=(0.8, 0.2, 0.0))
  assert sorted(with_zero.values()).count('test') == 0
  with pytest.raises(ProgressionError, match='fractions'):
    cohort.split_subjects(subjects, fractions=(0.5, 0.2, 0.2))


# ----------------------------------------------------------------------------- specs

def test_all_shipped_specs_load():
  for name in ('synthetic', 'clinica_bids', 'adnimerge', 'oasis3'):
    spec = cohort.load_spec(name)
    assert spec.name == name and spec.layout in ('bids', 'table')


def test_spec_errors(tmp_path):
  with pytest.raises(ProgressionError, match=r"unknown cohort spec 'adni'.*'adnimerge'"):
    cohort.load_spec('adni')
  text = Path(cohort.load_spec('synthetic').path).read_text()
  cases = [(text.replace('layout = "bids"', 'layout = "nifti"'), "layout = 'nifti'"),
           (text.replace('[age]', '[age]\nconvnetion = "x"'), r"unknown key\(s\) \['convnetion'\]"),
           (text.replace('mmse = "MMSE"', 'mmse_score = "MMSE"'), "field = 'mmse_score'"),
           (text.replace("'^ses-M(\\d+)$'", "'^ses-M\\d+$'"), 'exactly one group'),
           ('name = "x\n', 'invalid TOML')]
  adni = Path(cohort.load_spec('adnimerge').path).read_text()
  cases.append((adni.replace('column = "EXAMDATE"', 'column = "EXAMDATE"\nexam_date_column = "X"'),
                'exam_date_column is for source'))
  for i, (bad, match) in enumerate(cases):
    path = tmp_path / f'bad{i}.toml'
    path.write_text(bad)
    with pytest.raises(ProgressionError, match=match):
      cohort.load_spec(path)
