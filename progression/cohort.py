"""Cohorts: a TOML spec -> visits table -> every within-subject baseline/follow-up pair.

A cohort spec (`cohorts/<name>.toml`, see `cohorts/synthetic.toml` for a commented
example) declares the layout ("bids": participants.tsv + one sessions.tsv per
subject; "table": one row per visit, e.g. ADNIMERGE.csv), the files, the mapping
from our field names (subject, session and `covariates.FIELDS`) to the source's
column names, how a visit's time is read (session code, numeric column or date)
and how age at the visit is obtained. Code never hard-codes a cohort's paths.

Times are in years (1 year = 12 months = 365.25 days). Error messages name the
file, the data row (1-based, header excluded), subject, session and field.
Image existence is checked here; images are not loaded.
"""

import dataclasses
import datetime
import hashlib
import itertools
import math
import os
import re
import string
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from progression.covariates import (FIELDS, Covariates, covariates_to_dict, is_missing,
                                    parse_covariates)
from progression.errors import ProgressionError

PathLike = str | os.PathLike
COHORTS_DIR = Path(__file__).resolve().parents[1] / 'cohorts'
DAYS_PER_YEAR = 365.25
YEARS_PER_UNIT = {'days': 1.0 / DAYS_PER_YEAR, 'months': 1.0 / 12.0, 'years': 1.0}
SPEC_FIELDS = ('subject', 'session') + FIELDS
SPLITS = ('train', 'val', 'test')
VISIT_COLUMNS = ('subject', 'session', 'age_years', 'years_from_first', 'sex', 'diagnosis',
                 'mmse', 'cdrsb', 'apoe4', 'education_years', 'image_path', 'labels_path')
PAIR_COLUMNS = ('subject', 'baseline_session', 'followup_session', 'interval_years',
                'baseline_image', 'followup_image', 'baseline_labels', 'followup_labels'
                ) + FIELDS + ('followup_diagnosis',)
_FLOAT_COLUMNS = ('age_years', 'years_from_first', 'interval_years', 'mmse', 'cdrsb', 'apoe4',
                  'education_years')
_EPOCH = datetime.datetime(1970, 1, 1)


@dataclasses.dataclass(frozen=True)
class TableSpec:
  """One source table: `path` relative to the root ('{subject}' allowed in BIDS),
  `columns` our field -> source column, `required` fields whose column must exist."""
  path: str
  columns: dict[str, str]
  required: tuple[str, ...] = ()
  delimiter: str = '\t'


@dataclasses.dataclass(frozen=True)
class TimeSpec:
  """Visit time: from the session id ('session'), a numeric 'column' (both through an
  optional regex `pattern` with one group, in `unit`), or a 'date' column."""
  source: str
  unit: str = 'days'
  pattern: str | None = None
  column: str | None = None
  date_format: str = '%Y-%m-%d'


@dataclasses.dataclass(frozen=True)
class AgeSpec:
  """'at_visit': the age column is the age at the visit. 'at_reference_session': age
  at the subject's `reference_session` (date from `reference_date_column` when that
  column has a value). 'at_time_zero': age when the visit time was 0 (e.g. entry)."""
  convention: str = 'at_visit'
  reference_session: str | None = None
  reference_date_column: str | None = None


@dataclasses.dataclass(frozen=True)
class CohortSpec:
  """A parsed cohort spec (see the module docstring and cohorts/*.toml)."""
  name: str
  layout: str
  visits: TableSpec
  image: str
  time: TimeSpec
  age: AgeSpec = AgeSpec()
  participants: TableSpec | None = None
  labels: str | None = None
  labels_required: bool = False
  on_missing_image: str = 'error'
  value_maps: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
  transforms: dict[str, str] = dataclasses.field(default_factory=dict)
  description: str = ''
  path: str | None = None


# ----------------------------------------------------------------------------- specs

def load_spec(name_or_path: PathLike) -> CohortSpec:
  """Reads `cohorts/<name>.toml` (a bare name) or a .toml file path into a CohortSpec."""
  text = str(name_or_path)
  path = Path(text)
  if not (text.endswith('.toml') or os.sep in text or path.is_file()):
    path = COHORTS_DIR / f'{text}.toml'
    if not path.is_file():
      known = sorted(p.stem for p in COHORTS_DIR.glob('*.toml'))
      raise ProgressionError(f'unknown cohort spec {text!r}; known: {known} (or give a .toml path)')
  if not path.is_file():
    raise ProgressionError(f'{path}: cohort spec file not found')
  try:
    data = tomllib.loads(path.read_text())
  except tomllib.TOMLDecodeError as e:
    raise ProgressionError(f'{path}: invalid TOML: {e}') from None
  return _parse_spec(data, str(path))


_NO_DEFAULT = object()


def _get(table: Mapping[str, Any], key: str, where: str, kind: type | tuple[type, ...],
         default: Any = _NO_DEFAULT) -> Any:
  if key not in table:
    if default is _NO_DEFAULT:
      raise ProgressionError(f'{where}: missing key {key!r}')
    return default
  if not isinstance(table[key], kind):
    raise ProgressionError(f'{where}: key {key!r} has bad value {table[key]!r}')
  return table[key]


def _check_keys(table: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
  unknown = sorted(set(table) - set(allowed))
  if unknown:
    raise ProgressionError(f'{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}')


def _choice(value: str, options: Iterable[str], where: str, key: str) -> str:
  if value not in options:
    raise ProgressionError(f'{where}: {key} = {value!r} is not one of {sorted(options)}')
  return value


def _parse_table(data: Mapping[str, Any], where: str) -> TableSpec:
  _check_keys(data, ('path', 'delimiter', 'required', 'columns'), where)
  columns = dict(_get(data, 'columns', where, dict))
  for field, column in columns.items():
    _choice(field, SPEC_FIELDS, f'{where}.columns', 'field')
    _get(columns, field, f'{where}.columns', str)
  required = tuple(_get(data, 'required', where, list, []))
  for field in required:
    if field not in columns:
      raise ProgressionError(f'{where}: required field {field!r} has no entry in [columns]')
  return TableSpec(path=_get(data, 'path', where, str), columns=columns, required=required,
                   delimiter=_get(data, 'delimiter', where, str, '\t'))


def _check_pattern(pattern: str, where: str) -> str:
  try:
    names = [name for _, name, _, _ in string.Formatter().parse(pattern) if name is not None]
  except ValueError as e:
    raise ProgressionError(f'{where}: bad path pattern {pattern!r}: {e}') from None
  if any(not name or name.isdigit() for name in names):
    raise ProgressionError(f'{where}: path pattern {pattern!r} needs named placeholders')
  return pattern


def _parse_time(data: Mapping[str, Any], where: str) -> TimeSpec:
  _check_keys(data, ('source', 'unit', 'pattern', 'column', 'date_format'), where)
  time = TimeSpec(source=_choice(_get(data, 'source', where, str), ('session', 'column', 'date'),
                                 where, 'source'),
                  unit=_choice(_get(data, 'unit', where, str, 'days'), YEARS_PER_UNIT, where,
                               'unit'),
                  pattern=_get(data, 'pattern', where, str, None),
                  column=_get(data, 'column', where, str, None),
                  date_format=_get(data, 'date_format', where, str, '%Y-%m-%d'))
  if time.source != 'session' and time.column is None:
    raise ProgressionError(f'{where}: source = {time.source!r} needs a column')
  if time.pattern is not None:
    try:
      groups = re.compile(time.pattern).groups
    except re.error as e:
      raise ProgressionError(f'{where}: bad pattern {time.pattern!r}: {e}') from None
    if groups != 1:
      raise ProgressionError(f'{where}: pattern {time.pattern!r} needs exactly one group')
  return time


def _parse_age(data: Mapping[str, Any], time: TimeSpec, where: str) -> AgeSpec:
  _check_keys(data, ('convention', 'reference_session', 'reference_date_column'), where)
  age = AgeSpec(convention=_choice(_get(data, 'convention', where, str, 'at_visit'),
                                   ('at_visit', 'at_reference_session', 'at_time_zero'), where,
                                   'convention'),
                reference_session=_get(data, 'reference_session', where, str, None),
                reference_date_column=_get(data, 'reference_date_column', where, str, None))
  if age.convention == 'at_reference_session' and age.reference_session is None:
    raise ProgressionError(f'{where}: at_reference_session needs reference_session')
  if age.reference_date_column and time.source != 'date':
    raise ProgressionError(f'{where}: reference_date_column needs [time] source = "date"')
  if age.convention == 'at_time_zero' and time.source == 'date':
    raise ProgressionError(f'{where}: at_time_zero needs times counted from entry, not dates')
  return age


def _parse_spec(data: Mapping[str, Any], where: str) -> CohortSpec:
  _check_keys(data, ('name', 'layout', 'description', 'on_missing_image', 'participants',
                     'visits', 'images', 'time', 'age', 'values', 'transforms'), where)
  images = _get(data, 'images', where, dict)
  where_images = f'{where} [images]'
  _check_keys(images, ('image', 'labels', 'labels_required'), where_images)
  time = _parse_time(_get(data, 'time', where, dict), f'{where} [time]')
  participants = _get(data, 'participants', where, dict, None)
  spec = CohortSpec(
      name=_get(data, 'name', where, str),
      layout=_choice(_get(data, 'layout', where, str), ('bids', 'table'), where, 'layout'),
      description=_get(data, 'description', where, str, ''),
      on_missing_image=_choice(_get(data, 'on_missing_image', where, str, 'error'),
                               ('error', 'skip'), where, 'on_missing_image'),
      participants=(None if participants is None
                    else _parse_table(participants, f'{where} [participants]')),
      visits=_parse_table(_get(data, 'visits', where, dict), f'{where} [visits]'),
      image=_check_pattern(_get(images, 'image', where_images, str), where_images),
      labels=(None if 'labels' not in images
              else _check_pattern(_get(images, 'labels', where_images, str), where_images)),
      labels_required=_get(images, 'labels_required', where_images, bool, False),
      time=time, age=_parse_age(_get(data, 'age', where, dict, {}), time, f'{where} [age]'),
      value_maps=_parse_values(_get(data, 'values', where, dict, {}), f'{where} [values]'),
      transforms=_parse_transforms(_get(data, 'transforms', where, dict, {}), where),
      path=where)
  _check_layout(spec, where)
  return spec


def _parse_values(data: Mapping[str, Any], where: str) -> dict[str, dict[str, str]]:
  for field, mapping in data.items():
    _choice(field, FIELDS, where, 'field')
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
      raise ProgressionError(f'{where}: [values.{field}] must map source strings to strings')
  return {field: dict(mapping) for field, mapping in data.items()}


def _parse_transforms(data: Mapping[str, Any], where: str) -> dict[str, str]:
  for field, name in data.items():
    _choice(field, FIELDS, f'{where} [transforms]', 'field')
    _choice(name, _TRANSFORMS, f'{where} [transforms]', field)
  return dict(data)


def _check_layout(spec: CohortSpec, where: str) -> None:
  if 'session' not in spec.visits.columns:
    raise ProgressionError(f'{where}: [visits.columns] needs a session column')
  if spec.layout == 'table':
    if spec.participants is not None or 'subject' not in spec.visits.columns:
      raise ProgressionError(f'{where}: layout "table" reads subjects from [visits.columns] '
                             'subject and takes no [participants]')
    return
  if spec.participants is None or 'subject' not in spec.participants.columns:
    raise ProgressionError(f'{where}: layout "bids" needs [participants] with a subject column')
  if '{subject}' not in spec.visits.path:
    raise ProgressionError(f'{where}: layout "bids" needs {{subject}} in [visits] path')
  both = set(spec.participants.columns) & set(spec.visits.columns) & set(FIELDS)
  if both:
    raise ProgressionError(f'{where}: field(s) {sorted(both)} mapped in both tables')


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


def _e4_count(value: Any, where: str, field: str) -> Any:
  """APOE genotype such as 34, '3/4' or 'e3e4' -> number of e4 alleles (0-2)."""
  if is_missing(value):
    return None
  match = re.fullmatch(r'[eE]?([234])\s*[/|,-]?\s*[eE]?([234])', str(value).strip())
  if match is None:
    raise ProgressionError(f'{where}: field {field} has bad value {value!r} (expected an APOE '
                           'genotype such as 34 or e3/e4)')
  return match.groups().count('4')


_TRANSFORMS = {'e4_count': _e4_count}


def _raw_covariates(spec: CohortSpec, row: _Row) -> dict[str, Any]:
  raw = {}
  for field, value in row.fields.items():
    value = spec.value_maps.get(field, {}).get(value.strip(), value)
    if field in spec.transforms:
      value = _TRANSFORMS[spec.transforms[field]](value, row.where, field)
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
  (years since the subject's first listed visit), the covariates of
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
  _check_duplicates(rows)
  reference = {r.subject: r.time_years for r in rows if r.session == spec.age.reference_session}
  records = []
  for row in rows:
    image, labels = _paths(spec, root, row)
    if image is not None:
      records.append({'subject': row.subject, 'session': row.session,
                      'time_years': row.time_years,
                      **covariates_to_dict(_row_covariates(spec, row, reference)),
                      'image_path': image, 'labels_path': labels})
  first = {}
  for rec in records:
    first[rec['subject']] = min(first.get(rec['subject'], math.inf), rec['time_years'])
  for rec in records:
    rec['years_from_first'] = rec.pop('time_years') - first[rec['subject']]
  visits = _frame(records, VISIT_COLUMNS)
  return visits.sort_values(['subject', 'years_from_first'], kind='stable',
                            ignore_index=True)


def _frame(records: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
  """Floats as float64 (NaN = missing); strings kept as objects (None = missing)."""
  data = {c: pd.Series([r[c] for r in records],
                       dtype='float64' if c in _FLOAT_COLUMNS else object)
          for c in columns}
  return pd.DataFrame(data, columns=list(columns))


# ----------------------------------------------------------------------------- pairs, splits

def make_pairs(visits: pd.DataFrame) -> pd.DataFrame:
  """Every (i < j) pair of a subject's visits: baseline i, follow-up j (`PAIR_COLUMNS`).

  interval_years = follow-up minus baseline years_from_first (> 0). The covariate
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
