"""Cohort specs: the TOML file that says where a cohort's tables and images are.

A cohort spec (`cohorts/<name>.toml`, see `cohorts/synthetic.toml` for a commented
example) declares the layout ("bids": participants.tsv + one sessions.tsv per
subject; "table": one row per visit, e.g. ADNIMERGE.csv), the files, the mapping
from our field names (subject, session and `covariates.FIELDS`) to the source's
column names, how a visit's time is read (session code, numeric column or date; optionally real
exam dates that override nominal session times),
how age at the visit is obtained, optional value maps and transforms applied
to raw covariate values, and whether follow-ups are rigidly registered to their baseline
(`[registration]`, `RegistrationSpec`). Code never hard-codes a cohort's paths.

`load_spec` parses and validates a spec into a frozen `CohortSpec` (with
`TableSpec`, `TimeSpec` and `AgeSpec` parts); errors name the spec file and the
offending table/key. Nothing here reads the cohort's data: `progression.cohort`
turns a spec into visits and pairs.
"""

import dataclasses
import os
import re
import string
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from progression.covariates import FIELDS, is_missing
from progression.errors import ProgressionError

PathLike = str | os.PathLike
COHORTS_DIR = Path(__file__).resolve().parents[1] / 'cohorts'
DAYS_PER_YEAR = 365.25
YEARS_PER_UNIT = {'days': 1.0 / DAYS_PER_YEAR, 'months': 1.0 / 12.0, 'years': 1.0}
SPEC_FIELDS = ('subject', 'session') + FIELDS


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
  optional regex `pattern` with one group, in `unit`), or a 'date' column.

  `exam_date_column` (with 'session' or 'column'; `date_format`): a column of real exam
  dates. A subject whose visits all have one gets intervals from the dates (days /
  365.25) instead of the nominal session times (e.g. Clinica's ses-M012 = 12 months);
  with source 'date', `column` is the exam date itself.
  """
  source: str
  unit: str = 'days'
  pattern: str | None = None
  column: str | None = None
  date_format: str = '%Y-%m-%d'
  exam_date_column: str | None = None


@dataclasses.dataclass(frozen=True)
class AgeSpec:
  """'at_visit': the age column is the age at the visit. 'at_reference_session': age
  at the subject's `reference_session` (date from `reference_date_column` when that
  column has a value). 'at_time_zero': age when the visit time was 0 (e.g. entry)."""
  convention: str = 'at_visit'
  reference_session: str | None = None
  reference_date_column: str | None = None


@dataclasses.dataclass(frozen=True)
class RegistrationSpec:
  """`[registration]`: rigid registration of each follow-up to its baseline before training
  and evaluation (`progression.registration`). `enabled` (default true: real scans move
  between sessions); `on_failure`: "error" refuses a cohort with a pair whose alignment fails
  the check, "skip" leaves such pairs out (each named in a warning)."""
  enabled: bool = True
  on_failure: str = 'error'


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
  registration: RegistrationSpec = RegistrationSpec()


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
  _check_keys(data, ('source', 'unit', 'pattern', 'column', 'date_format', 'exam_date_column'),
              where)
  time = TimeSpec(source=_choice(_get(data, 'source', where, str), ('session', 'column', 'date'),
                                 where, 'source'),
                  unit=_choice(_get(data, 'unit', where, str, 'days'), YEARS_PER_UNIT, where,
                               'unit'),
                  pattern=_get(data, 'pattern', where, str, None),
                  column=_get(data, 'column', where, str, None),
                  date_format=_get(data, 'date_format', where, str, '%Y-%m-%d'),
                  exam_date_column=_get(data, 'exam_date_column', where, str, None))
  if time.source != 'session' and time.column is None:
    raise ProgressionError(f'{where}: source = {time.source!r} needs a column')
  if time.source == 'date' and time.exam_date_column is not None:
    raise ProgressionError(f'{where}: exam_date_column is for source = "session" or "column"; '
                           'with source = "date", column is the exam date')
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
                     'visits', 'images', 'time', 'age', 'values', 'transforms',
                     'registration'), where)
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
      path=where,
      registration=_parse_registration(_get(data, 'registration', where, dict, {}),
                                       f'{where} [registration]'))
  _check_layout(spec, where)
  return spec


def _parse_registration(data: Mapping[str, Any], where: str) -> RegistrationSpec:
  _check_keys(data, ('enabled', 'on_failure'), where)
  return RegistrationSpec(enabled=_get(data, 'enabled', where, bool, True),
                          on_failure=_choice(_get(data, 'on_failure', where, str, 'error'),
                                             ('error', 'skip'), where, 'on_failure'))


def _parse_values(data: Mapping[str, Any], where: str) -> dict[str, dict[str, str]]:
  for field, mapping in data.items():
    _choice(field, FIELDS, where, 'field')
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
      raise ProgressionError(f'{where}: [values.{field}] must map source strings to strings')
  return {field: dict(mapping) for field, mapping in data.items()}


def _parse_transforms(data: Mapping[str, Any], where: str) -> dict[str, str]:
  for field, name in data.items():
    _choice(field, FIELDS, f'{where} [transforms]', 'field')
    _choice(name, TRANSFORMS, f'{where} [transforms]', field)
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


# ----------------------------------------------------------------------------- transforms

def _e4_count(value: Any, where: str, field: str) -> Any:
  """APOE genotype such as 34, '3/4' or 'e3e4' -> number of e4 alleles (0-2)."""
  if is_missing(value):
    return None
  match = re.fullmatch(r'[eE]?([234])\s*[/|,-]?\s*[eE]?([234])', str(value).strip())
  if match is None:
    raise ProgressionError(f'{where}: field {field} has bad value {value!r} (expected an APOE '
                           'genotype such as 34 or e3/e4)')
  return match.groups().count('4')


TRANSFORMS = {'e4_count': _e4_count}
