"""Cohorts: a TOML spec -> visits table -> every within-subject baseline/follow-up pair.

The spec (`cohorts/<name>.toml`) is parsed and validated by `progression.cohort_spec`;
`CohortSpec` and `load_spec` are re-exported here. This module reads a cohort's
visits as the spec describes (layout, files, column mapping, visit time, age at
the visit), builds the baseline/follow-up pairs and splits subjects.

Times are in years (1 year = 12 months = 365.25 days). Intervals come from real exam
dates where the spec names an exam-date column and a subject's visits all have one,
else from the session ids (or time column); `time_source` / `interval_source` say which.
Error messages name the file, the data row (1-based, header excluded), subject, session
and field.
Image existence is checked here; images are not loaded.
"""

import dataclasses
import datetime
import hashlib
import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from absl import logging

from progression.cohort_spec import (DAYS_PER_YEAR, TRANSFORMS, YEARS_PER_UNIT, CohortSpec,
                                     PathLike, TableSpec, TimeSpec, load_spec)
from progression.covariates import (FIELDS, Covariates, covariates_to_dict, is_missing,
                                    parse_covariates)
from progression.errors import ProgressionError

SPLITS = ('train', 'val', 'test')
VISIT_COLUMNS = ('subject', 'session', 'age_years', 'years_from_first', 'time_source', 'sex',
                 'diagnosis', 'mmse', 'cdrsb', 'apoe4', 'education_years', 'image_path',
                 'labels_path')
PAIR_COLUMNS = ('subject', 'baseline_session', 'followup_session', 'interval_years',
                'interval_source', 'baseline_image', 'followup_image', 'baseline_labels',
                'followup_labels') + FIELDS + ('followup_diagnosis',)
_FLOAT_COLUMNS = ('age_years', 'years_from_first', 'interval_years', 'mmse', 'cdrsb', 'apoe4',
                  'education_years')
_EPOCH = datetime.datetime(1970, 1, 1)
# Values of time_source / interval_source: where a visit's time came from.
TIME_SOURCES = ('exam_date', 'session_id', 'time_column')


# ----------------------------------------------------------------------------- reading

@dataclasses.dataclass
class _Row:
  """One source visit before validation: ids, source columns, raw covariates, time."""
  where: str
  subject: str
  session: str
  source: dict[str, str]
  fields: dict[str, str]
  time_years: float = math.nan
  time_code: str = ''
  exam_years: float = math.nan  # Exam date in years since 1970 (NaN: none).


def _read_table(path: Path, delimiter: str) -> pd.DataFrame:
  if not path.is_file():
    raise ProgressionError(f'{path}: file not found')
  try:
    table = pd.read_csv(path, sep=delimiter, dtype=str, keep_default_na=False)
  except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
    raise ProgressionError(f'{path}: cannot read table: {e}') from None
  table.columns = [str(c).strip() for c in table.columns]
  return table


def _check_columns(table: pd.DataFrame, path: Path, spec: CohortSpec,
                   needed: dict[str, str]) -> None:
  """`needed`: source column -> what needs it; raises naming the file and column."""
  for column, reason in needed.items():
    if column not in table.columns:
      raise ProgressionError(f'{path}: column {column!r} ({reason}, required by cohort spec '
                             f'{spec.name!r}) is missing; available columns: '
                             f'{list(table.columns)}')


def _needed(table: TableSpec) -> dict[str, str]:
  return {table.columns[field]: f'field {field}' for field in table.required}


def _visit_needed(spec: CohortSpec) -> dict[str, str]:
  needed = _needed(spec.visits)
  if spec.time.column:
    needed[spec.time.column] = 'visit time'
  return needed


def _rows_of(table: pd.DataFrame, path: Path, columns: Mapping[str, str], subject: str | None,
             base: Mapping[str, str], base_fields: Mapping[str, str]) -> list[_Row]:
  rows = []
  for n, record in enumerate(table.to_dict('records'), start=1):
    subj = subject if subject is not None else record[columns['subject']].strip()
    session = record[columns['session']].strip()
    where = f'{path} row {n} subject {subj} session {session}'
    if not subj or not session:
      raise ProgressionError(f'{where}: empty subject or session id')
    fields = {f: record[c] for f, c in columns.items() if f in FIELDS and c in record}
    rows.append(_Row(where, subj, session, {**base, **record}, {**base_fields, **fields}))
  return rows


def _bids_rows(spec: CohortSpec, root: Path) -> list[_Row]:
  part = spec.participants
  path = root / part.path
  table = _read_table(path, part.delimiter)
  _check_columns(table, path, spec, {part.columns['subject']: 'field subject', **_needed(part)})
  rows, seen = [], {}
  for n, record in enumerate(table.to_dict('records'), start=1):
    subject = record[part.columns['subject']].strip()
    if not subject or subject in seen:
      raise ProgressionError(f'{path} row {n}: empty or duplicate subject id {subject!r}'
                             + (f' (also row {seen[subject]})' if subject in seen else ''))
    seen[subject] = n
    sessions_path = root / _format(spec.visits.path, {'subject': subject}, f'{path} row {n}')
    sessions = _read_table(sessions_path, spec.visits.delimiter)
    _check_columns(sessions, sessions_path, spec, _visit_needed(spec))
    base_fields = {f: record[c] for f, c in part.columns.items() if f in FIELDS and c in record}
    rows += _rows_of(sessions, sessions_path, spec.visits.columns, subject, record, base_fields)
  return rows


def _table_rows(spec: CohortSpec, root: Path) -> list[_Row]:
  path = root / spec.visits.path
  table = _read_table(path, spec.visits.delimiter)
  needed = {spec.visits.columns['subject']: 'field subject', **_visit_needed(spec)}
  _check_columns(table, path, spec, needed)
  return _rows_of(table, path, spec.visits.columns, None, {}, {})


def _format(pattern: str, values: Mapping[str, str], where: str) -> str:
  try:
    return pattern.format_map(values)
  except KeyError as e:
    raise ProgressionError(f'{where}: path pattern {pattern!r} uses {{{e.args[0]}}}, which is '
                           f'not available here; available: {sorted(values)}') from None


def _date_years(raw: str, fmt: str, where: str, column: str) -> float:
  try:
    date = datetime.datetime.strptime(raw.strip(), fmt)
  except ValueError:
    raise ProgressionError(f'{where}: column {column} has bad date {raw!r} '
                           f'(expected format {fmt})') from None
  return (date - _EPOCH).total_seconds() / 86400.0 / DAYS_PER_YEAR


def _set_time(time: TimeSpec, row: _Row) -> None:
  """Sets row.time_years (years since the source's zero) and row.time_code."""
  if time.source == 'date':
    row.time_code = row.source[time.column].strip()
    row.time_years = _date_years(row.time_code, time.date_format, row.where, time.column)
    return
  what = 'session id' if time.source == 'session' else f'column {time.column}'
  raw = row.session if time.source == 'session' else row.source[time.column].strip()
  code = raw
  if time.pattern is not None:
    match = re.search(time.pattern, raw)
    if match is None:
      raise ProgressionError(f'{row.where}: {what} {raw!r} does not match the time pattern '
                             f'{time.pattern!r}')
    code = match.group(1)
  try:
    value = float(code)
  except ValueError:
    raise ProgressionError(f'{row.where}: {what} {raw!r} gives no time in {time.unit}') from None
  row.time_years, row.time_code = value * YEARS_PER_UNIT[time.unit], code


def _set_exam_date(time: TimeSpec, row: _Row) -> None:
  """Sets row.exam_years from the spec's exam-date column (NaN when absent or empty)."""
  if time.source == 'date':
    row.exam_years = row.time_years
    return
  raw = row.source.get(time.exam_date_column) if time.exam_date_column else None
  if not is_missing(raw):
    row.exam_years = _date_years(raw, time.date_format, row.where, time.exam_date_column)


def _check_duplicates(rows: Sequence[_Row]) -> None:
  by_session, by_time = {}, {}
  for row in rows:
    first = by_session.setdefault((row.subject, row.session), row)
    if first is not row:
      raise ProgressionError(f'{row.where}: duplicate visit (same subject and session as '
                             f'{first.where})')
    first = by_time.setdefault((row.subject, round(row.time_years, 9)), row)
    if first is not row:
      raise ProgressionError(f'{row.where}: duplicate visit (same subject and date/time '
                             f'{row.time_code!r} as {first.where}); a follow-up must come '
                             'after its baseline')




def _raw_covariates(spec: CohortSpec, row: _Row) -> dict[str, Any]:
  raw = {}
  for field, value in row.fields.items():
    value = spec.value_maps.get(field, {}).get(value.strip(), value)
    if field in spec.transforms:
      value = TRANSFORMS[spec.transforms[field]](value, row.where, field)
    raw[field] = value
  return raw


def _age_offset_years(spec: CohortSpec, row: _Row, reference: Mapping[str, float]) -> float:
  """Years to add to the age column to get the age at this visit."""
  if spec.age.convention == 'at_time_zero':
    return row.time_years
  column = spec.age.reference_date_column
  if column and not is_missing(row.source.get(column)):
    return row.time_years - _date_years(row.source[column], spec.time.date_format, row.where,
                                        column)
  if row.subject not in reference:
    raise ProgressionError(f'{row.where}: cannot compute age at the visit: subject has no '
                           f'{spec.age.reference_session!r} visit'
                           + (f' and no {column} value' if column else ''))
  return row.time_years - reference[row.subject]


def _row_covariates(spec: CohortSpec, row: _Row, reference: Mapping[str, float]) -> Covariates:
  cov = parse_covariates(_raw_covariates(spec, row), row.where)
  if cov.age_years is None or spec.age.convention == 'at_visit':
    return cov
  age = cov.age_years + _age_offset_years(spec, row, reference)
  return parse_covariates({**covariates_to_dict(cov), 'age_years': age},
                          f'{row.where} (age at the visit)')


def _paths(spec: CohortSpec, root: Path, row: _Row) -> tuple[str | None, str | None]:
  values = {**{k: str(v).strip() for k, v in row.source.items()}, 'subject': row.subject,
            'session': row.session, 'time_code': row.time_code}
  image = root / _format(spec.image, values, row.where)
  if not image.is_file():
    if spec.on_missing_image == 'skip':
      return None, None
    raise ProgressionError(f'{row.where}: image file not found: {image}')
  if not spec.labels:
    return str(image), None
  labels = root / _format(spec.labels, values, row.where)
  if labels.is_file():
    return str(image), str(labels)
  if spec.labels_required:
    raise ProgressionError(f'{row.where}: label map not found: {labels}')
  return str(image), None


def read_visits(spec: CohortSpec, root: PathLike) -> pd.DataFrame:
  """Reads every visit of a cohort into a table (see `VISIT_COLUMNS`).

  Columns: subject, session, age_years (age at the visit, years), years_from_first
  (years since the subject's first listed visit), time_source (`TIME_SOURCES`: 'exam_date'
  when the spec names exam dates and every visit of the subject has one, else
  'session_id' or 'time_column': nominal times), the covariates of
  `covariates.FIELDS` (NaN/None when missing), image_path (absolute str) and
  labels_path (str or None). Sorted by subject, then years_from_first.

  Raises:
    ProgressionError: naming file/row/subject/session/field, for missing files or
      spec columns (listing the available ones), duplicate visits (same session, or
      same date), bad covariate values and missing images (unless the spec says
      on_missing_image = "skip").
  """
  root = Path(root).resolve()
  rows = _bids_rows(spec, root) if spec.layout == 'bids' else _table_rows(spec, root)
  for row in rows:
    _set_time(spec.time, row)
    _set_exam_date(spec.time, row)
  _check_duplicates(rows)
  reference = {r.subject: r.time_years for r in rows if r.session == spec.age.reference_session}
  records = []
  for row in rows:
    image, labels = _paths(spec, root, row)
    if image is not None:
      records.append({'subject': row.subject, 'session': row.session, 'where': row.where,
                      'time_years': row.time_years, 'exam_years': row.exam_years,
                      **covariates_to_dict(_row_covariates(spec, row, reference)),
                      'image_path': image, 'labels_path': labels})
  _set_years_from_first(spec.time, records)
  _check_ages_increase(records)
  visits = _frame(records, VISIT_COLUMNS)
  return visits.sort_values(['subject', 'years_from_first'], kind='stable',
                            ignore_index=True)


def _set_years_from_first(time: TimeSpec, records: Sequence[dict[str, Any]]) -> None:
  """Sets years_from_first and time_source per subject: from exam dates when every visit
  of the subject has one (and the spec names them), else from the nominal visit times."""
  nominal = 'session_id' if time.source == 'session' else 'time_column'
  by_subject: dict[str, list[dict[str, Any]]] = {}
  for rec in records:
    by_subject.setdefault(rec['subject'], []).append(rec)
  undated = []
  for visits in by_subject.values():
    dated = all(not math.isnan(r['exam_years']) for r in visits)
    key, source = ('exam_years', 'exam_date') if dated else ('time_years', nominal)
    if dated:
      _check_distinct_dates(visits)
    elif time.exam_date_column:
      undated.append(next(r['where'] for r in visits if math.isnan(r['exam_years'])))
    first = min(r[key] for r in visits)
    for rec in visits:
      rec['years_from_first'], rec['time_source'] = rec[key] - first, source
      del rec['time_years'], rec['exam_years']
  if undated:
    logging.warning('%d subject(s) lack an exam date (column %s) on some visit, e.g. %s: their '
                    'intervals come from the nominal session times instead', len(undated),
                    time.exam_date_column, undated[0])


def _check_distinct_dates(visits: Sequence[Mapping[str, Any]]) -> None:
  seen = {}
  for rec in visits:
    first = seen.setdefault(round(rec['exam_years'], 9), rec)
    if first is not rec:
      raise ProgressionError(f"{rec['where']}: duplicate visit (same subject and exam date as "
                             f"{first['where']}); a follow-up must come after its baseline")


def _check_ages_increase(records: Sequence[Mapping[str, Any]]) -> None:
  """Age at the visit must not fall as the visit time grows (catches swapped ages/sessions)."""
  by_subject: dict[str, list[Mapping[str, Any]]] = {}
  for rec in records:
    by_subject.setdefault(rec['subject'], []).append(rec)
  for visits in by_subject.values():
    aged = sorted((r for r in visits if not is_missing(r['age_years'])),
                  key=lambda r: r['years_from_first'])
    for earlier, later in zip(aged, aged[1:]):
      if later['age_years'] < earlier['age_years'] - 1e-6:
        raise ProgressionError(
            f"{later['where']}: field age: age at the visit {later['age_years']:.2f} y is below "
            f"{earlier['age_years']:.2f} y at the earlier session {earlier['session']} "
            f"({later['years_from_first'] - earlier['years_from_first']:.2f} y before); the "
            'visit time and the age disagree')


def _frame(records: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
  """Floats as float64 (NaN = missing); strings kept as objects (None = missing)."""
  data = {c: pd.Series([r[c] for r in records],
                       dtype='float64' if c in _FLOAT_COLUMNS else object)
          for c in columns}
  return pd.DataFrame(data, columns=list(columns))


# ----------------------------------------------------------------------------- pairs, splits

def make_pairs(visits: pd.DataFrame) -> pd.DataFrame:
  """Every (i < j) pair of a subject's visits: baseline i, follow-up j (`PAIR_COLUMNS`).

  interval_years = follow-up minus baseline years_from_first (> 0); interval_source is
  their time_source (`TIME_SOURCES`: 'exam_date' when both times are real exam dates,
  'session_id' / 'time_column' when nominal; 'mixed' if the two differ). The covariate
  columns hold the BASELINE visit's values; followup_diagnosis the follow-up's.
  """
  missing = [c for c in VISIT_COLUMNS if c not in visits.columns]
  if missing:
    raise ProgressionError(f'make_pairs: visits table lacks column(s) {missing}')
  records = []
  for subject, group in visits.groupby('subject', sort=True):
    ordered = group.sort_values('years_from_first', kind='stable').to_dict('records')
    for base, follow in itertools.combinations(ordered, 2):
      interval = follow['years_from_first'] - base['years_from_first']
      if not interval > 0:
        raise ProgressionError(f'subject {subject}: follow-up session {follow["session"]} is not '
                               f'after baseline session {base["session"]} '
                               f'(interval {interval} years)')
      records.append({'subject': subject, 'baseline_session': base['session'],
                      'followup_session': follow['session'], 'interval_years': interval,
                      'interval_source': (base['time_source']
                                          if base['time_source'] == follow['time_source']
                                          else 'mixed'),
                      'baseline_image': base['image_path'], 'followup_image': follow['image_path'],
                      'baseline_labels': base['labels_path'],
                      'followup_labels': follow['labels_path'],
                      **{f: base[f] for f in FIELDS}, 'followup_diagnosis': follow['diagnosis']})
  return _frame(records, PAIR_COLUMNS)


def covariates_of(row: Mapping[str, Any]) -> Covariates:
  """Covariates of a visits row, or the baseline covariates of a pairs row."""
  session = row.get('session', row.get('baseline_session'))
  return parse_covariates({f: row.get(f) for f in FIELDS},
                          f'subject {row.get("subject")} session {session}')


def split_subjects(subjects: Iterable[str], fractions: Sequence[float] = (0.6, 0.2, 0.2),
                   seed: int = 0) -> dict[str, str]:
  """Assigns each subject to 'train', 'val' or 'test' (all of a subject's pairs together).

  Subjects are ordered by a seeded hash of their id, so the result does not depend
  on input order (and mostly survives adding subjects); split sizes follow
  `fractions` (largest remainder), and with >= 3 subjects every split with a
  positive fraction gets at least one.
  """
  if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
    raise ProgressionError(f'split fractions {tuple(fractions)} must be 3 non-negative numbers '
                           'summing to 1 (train, val, test)')
  unique = sorted(set(str(s) for s in subjects),
                  key=lambda s: hashlib.sha256(f'{seed}:{s}'.encode()).hexdigest())
  counts = _split_counts(len(unique), fractions)
  bounds = list(itertools.accumulate(counts))
  return {s: SPLITS[next(k for k in range(3) if i < bounds[k])] for i, s in enumerate(unique)}


def _split_counts(n: int, fractions: Sequence[float]) -> list[int]:
  exact = [f * n for f in fractions]
  counts = [math.floor(x) for x in exact]
  by_remainder = sorted(range(3), key=lambda k: (counts[k] - exact[k], k))
  for k in by_remainder[:n - sum(counts)]:
    counts[k] += 1
  for k in range(3):
    if n >= 3 and counts[k] == 0 and fractions[k] > 0:
      donor = max(range(3), key=lambda i: counts[i])
      counts[donor] -= 1
      counts[k] += 1
  return counts


def load_cohort(spec_name_or_path: PathLike | CohortSpec,
                root: PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
  """`read_visits` then `make_pairs`; the spec may be a name, a .toml path or a CohortSpec."""
  spec = (spec_name_or_path if isinstance(spec_name_or_path, CohortSpec)
          else load_spec(spec_name_or_path))
  visits = read_visits(spec, root)
  return visits, make_pairs(visits)
