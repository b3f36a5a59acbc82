"""Volumetric and image evaluation of forecasting methods against real follow-up MRIs.

A *method* is any object with a `name` and
`predict(pair_row, baseline: io.Volume, baseline_labels: io.Volume | None) -> Prediction`
(`baselines.Method`: the learned model, `baselines.NoChangeBaseline`,
`baselines.PopulationRateBaseline`, or a fake in tests); this module never touches training
code. For every pair of a table
(`cohort.make_pairs` columns) and every method, `evaluate_pairs` compares the prediction with
the real follow-up and returns one row per pair x region x method (`ROW_COLUMNS`):

- volumes (mL): `baseline_ml` and `true_ml` measured on the baseline and real follow-up (label
  maps, or the built-in tissue model when the cohort lacks them; `baselines.measure_volumes_ml`),
  `predicted_ml` from the method; `error_ml = predicted_ml - true_ml`, which is also the error in
  volume *change* since both changes start from `baseline_ml`; `abs_percent_error` =
  100 |error_ml| / true_ml (percent);
- annualised rates (compound percent/year, `baselines.annualized_rate_pct` from
  `baseline_ml`): true, predicted, and their difference `rate_error_pct_per_year`;
- image metrics of the pair x method, repeated on each of its region rows (so `pairs.csv` has
  exactly pairs x regions x methods rows): MSE / PSNR (dB) / SSIM with data_range 1 on
  intensities normalised by `preprocess.normalize_intensity` (each image by its own
  percentiles), inside the brain mask (`*_brain`: `brain_mask_of_labels` of the follow-up
  labels, i.e. every label but background and extracerebral CSF, or `tissue.brain_mask` of
  the follow-up without labels) and over the whole volume (`*_volume`).

`summarize` reduces the rows to means, medians and pair-level bootstrap CIs;
`comparisons.paired_comparisons` compares the model with every other method per subject;
`headline_table` is the methods x key-regions table; `write_report` writes `pairs.csv`,
`summary.csv`, `comparisons.csv`, `report.html` (figures from `figures`) and `report.md`.
"""

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from progression import cohort_spec, io, preprocess, registration
from progression import labels as L
from progression.errors import ProgressionError
from progression.evaluation import (baselines, comparisons, figures, image_metrics, tissue,
                                    volumes)
from progression.evaluation.baselines import Method, optional_text
from progression.evaluation.comparisons import PAIR_KEY, bootstrap_ci  # Also report.*.
from progression.evaluation.pair_checks import (REGISTRATION_COLUMN,  # Also report.*.
                                                check_pairs, pair_name)

IMAGE_METRICS = ('mse_brain', 'psnr_brain', 'ssim_brain', 'mse_volume', 'psnr_volume',
                 'ssim_volume')
ROW_COLUMNS = PAIR_KEY + (
    'interval_years', 'interval_bin', 'diagnosis', 'followup_diagnosis', 'age_years',
    'method', 'region', 'volume_method', 'baseline_ml', 'true_ml', 'predicted_ml',
    'true_change_ml', 'predicted_change_ml', 'error_ml', 'abs_error_ml', 'abs_percent_error',
    'true_rate_pct_per_year', 'predicted_rate_pct_per_year', 'rate_error_pct_per_year',
    'abs_rate_error_pct_per_year', 'interval_covered') + IMAGE_METRICS
# Interval bins (years): upper edges and labels; a pair falls in the first bin whose edge
# is >= its interval (visits at 6 months, 1, 2, 3 and 4+ years land in separate bins).
INTERVAL_EDGES_YEARS = (0.75, 1.5, 2.5, 4.0, math.inf)
INTERVAL_LABELS = ('0-0.75y', '0.75-1.5y', '1.5-2.5y', '2.5-4y', '4y+')
# summary.csv: metrics summarised per pair x region (volumes) and per pair (images).
VOLUME_METRICS = ('abs_error_ml', 'error_ml', 'abs_percent_error',
                  'abs_rate_error_pct_per_year', 'rate_error_pct_per_year', 'interval_covered')
GROUPINGS = {'all': None, 'diagnosis': 'diagnosis', 'interval': 'interval_bin'}
SUMMARY_COLUMNS = ('grouping', 'group', 'method', 'region', 'metric', 'n', 'mean', 'median',
                   'ci95_low', 'ci95_high')
IMAGE_REGION = 'image'  # `region` of the image-metric rows of the summary.
HEADLINE_REGIONS = {'labels': ('hippocampus', 'lateral_ventricles', 'whole_brain'),
                    'tissue': ('brain', 'gray_matter', 'csf')}
# Written all or nothing by `write_report`; report.md, the completion marker, last.
REPORT_FILES = ('pairs.csv', 'summary.csv', 'comparisons.csv', 'report.html', 'report.md')
REFERENCE_SUFFIX = ' (reference)'  # Marks `comparisons.REFERENCE_METHODS` in the headline.
# Headline columns: each method's MAE as a fraction of these baselines' (when present).
RATIO_BASELINES = ('population_rate', 'no_change')
_SSIM_MIN_SHAPE = 11  # Window of ssim_3d (sigma 1.5); smaller volumes use the uncropped map.


@dataclasses.dataclass(frozen=True)
class ExampleSlices:
  """Coronal slices `[x, z]` of one pair for the report figure (normalised intensities)."""
  title: str
  baseline: np.ndarray
  real: np.ndarray
  predicted: dict[str, np.ndarray]  # method name -> slice


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """`rows`: one per pair x region x method (`ROW_COLUMNS`); `examples`: figure slices."""
  rows: pd.DataFrame
  examples: list[ExampleSlices]
  methods: tuple[str, ...]
  volume_method: str


def interval_bin(years: float) -> str:
  """The `INTERVAL_LABELS` bin of an interval in years."""
  return next(label for edge, label in zip(INTERVAL_EDGES_YEARS, INTERVAL_LABELS)
              if years <= edge)


# ----------------------------------------------------------------------------- evaluation

def evaluate_pairs(pairs: pd.DataFrame, methods: Sequence[Method],
                   volume_method: str | None = None, num_examples: int = 2,
                   progress: Callable[[int, int], None] | None = None,
                   where: str = 'pairs',
                   registration_spec: cohort_spec.RegistrationSpec | None = None,
                   registration_cache_dir: str | Path | None = None) -> Evaluation:
  """Evaluates every method on every pair (see the module docstring for the row fields).

  Args:
    pairs: `cohort.make_pairs` rows (baseline covariates, interval_years, file paths).
    methods: objects with `name` and `predict`; names must be unique.
    volume_method: 'labels' or 'tissue'; default `baselines.volume_method_of(pairs)`. Every
      method's `Prediction.volume_method` must agree.
    num_examples: how many pairs (the first ones) keep slices for the example figure.
    progress: called as progress(pairs_done, num_pairs).
    where: names the table in error messages (e.g. "split 'test' of /data/cohort").
    registration_spec, registration_cache_dir: the cohort spec's `[registration]` and the
      registration cache (see `check_pairs`); None: follow-ups must be on the baseline grid.

  Raises:
    ProgressionError: empty table, missing follow-up image or label map, follow-up grid
      differing from the baseline grid, or a method's prediction off the baseline grid.
  """
  names = [m.name for m in methods]
  if not names or len(set(names)) != len(names):
    raise ProgressionError(f'evaluate_pairs: give methods with unique names, got {names}')
  pairs = check_pairs(pairs, where, registration_spec, registration_cache_dir)
  volume_method = volume_method or baselines.volume_method_of(pairs)
  records, examples = [], []
  rows = pairs.to_dict('records')
  for done, row in enumerate(rows, start=1):
    pair_records, example = _evaluate_pair(row, methods, volume_method,
                                           keep_slices=len(examples) < num_examples)
    records += pair_records
    if example is not None:
      examples.append(example)
    if progress is not None:
      progress(done, len(rows))
  table = pd.DataFrame.from_records(records, columns=list(ROW_COLUMNS))
  return Evaluation(rows=table, examples=examples, methods=tuple(names),
                    volume_method=volume_method)


def _load(row: Mapping[str, Any]) -> dict[str, io.Volume | None]:
  """The pair's volumes; a registered follow-up (`REGISTRATION_COLUMN`) resampled onto the
  baseline grid (image trilinear, labels nearest), with the files' own in '*_native'."""
  loaded = {'baseline': io.load_image(row['baseline_image']),
            'followup': io.load_image(row['followup_image'])}
  for key in ('baseline_labels', 'followup_labels'):
    path = optional_text(row.get(key))
    loaded[key] = None if path is None else io.load_labels(path)
  loaded['followup_native'] = loaded['followup']
  loaded['followup_labels_native'] = loaded['followup_labels']
  matrix = row.get(REGISTRATION_COLUMN)
  if matrix is not None:
    transform = registration.RigidTransform(np.asarray(matrix, np.float64))
    loaded['followup'] = registration.onto_fixed_grid(loaded['followup'], transform,
                                                      loaded['baseline'])
    if loaded['followup_labels'] is not None:
      loaded['followup_labels'] = registration.onto_fixed_grid(
          loaded['followup_labels'], transform, loaded['baseline'], labels=True)
  return loaded


def _evaluate_pair(row: Mapping[str, Any], methods: Sequence[Method], volume_method: str,
                   keep_slices: bool) -> tuple[list[dict], ExampleSlices | None]:
  v = _load(row)
  name = pair_name(row)
  baseline_ml = baselines.measure_volumes_ml(v['baseline'], v['baseline_labels'], volume_method)
  # True volumes on the files as stored: resampling a registered follow-up's labels (nearest
  # neighbour) would move region counts by about a voxel per boundary.
  true_ml = baselines.measure_volumes_ml(v['followup_native'], v['followup_labels_native'],
                                         volume_method)
  mask = (brain_mask_of_labels(v['followup_labels'].data) if v['followup_labels'] is not None
          else tissue.brain_mask(v['followup'].data))
  real = preprocess.normalize_intensity(v['followup'].data)
  records, predicted_slices = [], {}
  index = _slice_index(v['baseline_labels'], mask)
  # id(image) -> (image, normalised, metrics): the baselines all predict the baseline array,
  # so its (slow, 3D SSIM) metrics are computed once; keeping `image` keeps its id unique.
  scored = {}
  for method in methods:
    prediction = method.predict(row, v['baseline'], v['baseline_labels'])
    image = _check_prediction(prediction, method.name, name, v['baseline'], volume_method,
                              baseline_ml)
    if id(prediction.image) not in scored:
      predicted = preprocess.normalize_intensity(image)
      scored[id(prediction.image)] = (prediction.image, predicted,
                                      _image_metrics(predicted, real, mask))
    _, predicted, metrics = scored[id(prediction.image)]
    predicted_slices[method.name] = predicted[:, index, :]
    records += _region_records(row, method.name, volume_method, baseline_ml, true_ml,
                               prediction.volumes_ml, metrics, prediction.intervals_ml)
  example = None
  if keep_slices:
    baseline = preprocess.normalize_intensity(v['baseline'].data)
    example = ExampleSlices(title=f'{name} ({float(row["interval_years"]):.2f} y)',
                            baseline=baseline[:, index, :], real=real[:, index, :],
                            predicted=predicted_slices)
  return records, example


def brain_mask_of_labels(label_ids: np.ndarray) -> np.ndarray:
  """The brain mask of a label map: every label but background (0) and extracerebral CSF.

  Ventricles stay in (they are inside the brain and change with atrophy); the CSF label
  (`labels.CSF`, 24) around the brain is left out, so image metrics are not those of the
  intracranial volume. Returns a boolean array of `label_ids`' shape.
  """
  label_ids = np.asarray(label_ids)
  return (label_ids != L.BACKGROUND) & (label_ids != L.CSF)


def _check_prediction(prediction: baselines.Prediction, method: str, name: str,
                      baseline: io.Volume, volume_method: str,
                      baseline_ml: Mapping[str, float]) -> np.ndarray:
  image = np.asarray(prediction.image, dtype=np.float32)
  if image.shape != baseline.data.shape:
    raise ProgressionError(f'{name}: method {method!r} predicted an image of shape '
                           f'{image.shape}, not the baseline grid {baseline.data.shape}')
  if prediction.volume_method != volume_method:
    raise ProgressionError(f'{name}: method {method!r} measured volumes by '
                           f'{prediction.volume_method!r}; the evaluation uses {volume_method!r}')
  missing = sorted(set(baseline_ml) - set(prediction.volumes_ml))
  if missing:
    raise ProgressionError(f'{name}: method {method!r} predicted no volume for {missing}')
  return image


def _slice_index(baseline_labels: io.Volume | None, mask: np.ndarray) -> int:
  """Coronal (y) index through the hippocampi when labelled, else through the mask centre."""
  if baseline_labels is not None:
    hippocampus = np.isin(baseline_labels.data, volumes.default_regions()['hippocampus'])
    if hippocampus.any():
      return int(round(np.argwhere(hippocampus)[:, 1].mean()))
  return int(round(np.argwhere(mask)[:, 1].mean())) if mask.any() else mask.shape[1] // 2


def _image_metrics(predicted: np.ndarray, real: np.ndarray, mask: np.ndarray) -> dict:
  """MSE, PSNR (dB), SSIM at data_range 1 inside `mask` and over the whole volume."""
  whole = None if min(real.shape) >= _SSIM_MIN_SHAPE else np.ones(real.shape, bool)
  brain = image_metrics.image_metrics(predicted, real, 1.0, mask=mask if mask.any() else whole)
  volume = image_metrics.image_metrics(predicted, real, 1.0, mask=whole)
  return {**{f'{k}_brain': v for k, v in brain.items()},
          **{f'{k}_volume': v for k, v in volume.items()}}


def _region_records(row: Mapping[str, Any], method: str, volume_method: str,
                    baseline_ml: Mapping[str, float], true_ml: Mapping[str, float],
                    predicted_ml: Mapping[str, float], metrics: Mapping[str, float],
                    intervals_ml: Mapping[str, tuple[float, float]] | None = None
                    ) -> list[dict]:
  regions = list(baseline_ml)
  intervals_ml = intervals_ml or {}
  covered = [float(intervals_ml[r][0] <= true_ml[r] <= intervals_ml[r][1])
             if r in intervals_ml else math.nan for r in regions]
  years = float(row['interval_years'])
  v0 = np.array([baseline_ml[r] for r in regions])
  v1 = np.array([true_ml[r] for r in regions])
  vp = np.array([float(predicted_ml[r]) for r in regions])
  true_rate = baselines.annualized_rate_pct(v0, v1, years)
  predicted_rate = baselines.annualized_rate_pct(v0, vp, years)
  error = vp - v1
  with np.errstate(divide='ignore', invalid='ignore'):
    abs_percent = np.where(v1 > 0, 100.0 * np.abs(error) / np.where(v1 > 0, v1, 1.0), np.nan)
  common = {**{k: row[k] for k in PAIR_KEY}, 'interval_years': years,
            'interval_bin': interval_bin(years), 'diagnosis': _text(row.get('diagnosis')),
            'followup_diagnosis': _text(row.get('followup_diagnosis')),
            'age_years': row.get('age_years'), 'method': method,
            'volume_method': volume_method, **metrics}
  return [{**common, 'region': region, 'baseline_ml': v0[i], 'true_ml': v1[i],
           'predicted_ml': vp[i], 'true_change_ml': v1[i] - v0[i],
           'predicted_change_ml': vp[i] - v0[i], 'error_ml': error[i],
           'abs_error_ml': abs(error[i]), 'abs_percent_error': abs_percent[i],
           'true_rate_pct_per_year': true_rate[i], 'predicted_rate_pct_per_year':
           predicted_rate[i], 'rate_error_pct_per_year': predicted_rate[i] - true_rate[i],
           'abs_rate_error_pct_per_year': abs(predicted_rate[i] - true_rate[i]),
           'interval_covered': covered[i]}
          for i, region in enumerate(regions)]


def _text(value: Any) -> str:
  return optional_text(value) or 'unknown'


# ----------------------------------------------------------------------------- summary

def summarize(rows: pd.DataFrame, num_bootstrap: int = 1000, seed: int = 0) -> pd.DataFrame:
  """Mean, median and 95 % bootstrap CI of each metric (`SUMMARY_COLUMNS`).

  Groups: every method x region, over all pairs (grouping 'all'), by baseline diagnosis
  ('diagnosis') and by interval bin ('interval'). Volume metrics (`VOLUME_METRICS`) count
  each pair x region once; image metrics (`IMAGE_METRICS`, region 'image') each pair once.
  Non-finite values (e.g. a rate of an absent region, the PSNR of identical images) are
  left out; `n` counts the values used.
  """
  image_rows = rows.drop_duplicates([*PAIR_KEY, 'method']).assign(region=IMAGE_REGION)
  records = []
  for grouping, column in GROUPINGS.items():
    for table, metrics in ((rows, VOLUME_METRICS), (image_rows, IMAGE_METRICS)):
      keys = ['method', 'region'] + ([column] if column else [])
      for key, group in table.groupby(keys, sort=False):
        for metric in metrics:
          values = group[metric].to_numpy(np.float64)
          values = values[np.isfinite(values)]
          if values.size:
            low, high = bootstrap_ci(values, num_bootstrap, seed)
            records.append({'grouping': grouping, 'group': key[2] if column else 'all',
                            'method': key[0], 'region': key[1], 'metric': metric,
                            'n': int(values.size), 'mean': float(values.mean()),
                            'median': float(np.median(values)), 'ci95_low': low,
                            'ci95_high': high})
  summary = pd.DataFrame.from_records(records, columns=list(SUMMARY_COLUMNS))
  order = {'grouping': list(GROUPINGS), 'group': ['all', 'CN', 'MCI', 'AD', *INTERVAL_LABELS],
           'method': list(pd.unique(rows['method'])),
           'region': [*pd.unique(rows['region']), IMAGE_REGION],
           'metric': [*VOLUME_METRICS, *IMAGE_METRICS]}
  rank = {c: summary[c].map(lambda v, o=o: o.index(v) if v in o else len(o)) for c, o in
          order.items()}
  return summary.iloc[np.lexsort([rank[c] for c in reversed(list(order))])
                      ].reset_index(drop=True)


def headline_table(summary: pd.DataFrame, volume_method: str) -> pd.DataFrame:
  """Methods x (MAE in mL, mean |annualised-rate error| in percent/year) of key regions.

  Cells read 'mean [95 % CI low, high]' over all pairs; regions are hippocampus, lateral
  ventricles and whole brain (tissue classes without label maps). When 'model' is in the
  summary, each region also gets '<region> MAE / <baseline>' for the `RATIO_BASELINES`
  present: every method's MAE divided by that baseline's (so the model's row reads its MAE
  as a fraction of the baseline's; below 1 is better). Competitors come first in order of
  appearance, then `comparisons.REFERENCE_METHODS`, shown as e.g. 'oracle (reference)'.
  """
  overall = summary[summary['grouping'] == 'all']
  present = list(pd.unique(overall['method']))
  methods = ([m for m in present if m not in comparisons.REFERENCE_METHODS]
             + [m for m in present if m in comparisons.REFERENCE_METHODS])
  ratio_to = ([b for b in RATIO_BASELINES if b in present] if 'model' in present else [])
  table = {'method': [m + REFERENCE_SUFFIX if m in comparisons.REFERENCE_METHODS else m
                      for m in methods]}
  for region in HEADLINE_REGIONS[volume_method]:
    in_region = overall[overall['region'] == region]
    for metric, label in (('abs_error_ml', 'MAE (mL)'),
                          ('abs_rate_error_pct_per_year', 'rate error (%/y)')):
      cells = in_region[in_region['metric'] == metric]
      by_method = {m: _cell(row) for m, row in zip(cells['method'], cells.to_dict('records'))}
      table[f'{region} {label}'] = [by_method.get(m, 'n/a') for m in methods]
    errors = in_region[in_region['metric'] == 'abs_error_ml']
    mae = dict(zip(errors['method'], errors['mean']))
    for baseline in ratio_to:
      table[f'{region} MAE / {baseline}'] = [_ratio_cell(mae.get(m), mae.get(baseline))
                                             for m in methods]
  return pd.DataFrame(table)


def _ratio_cell(numerator: float | None, denominator: float | None) -> str:
  if numerator is None or denominator is None or not denominator > 0:
    return 'n/a'
  return f'{numerator / denominator:.3g}'


def _cell(row: Mapping[str, Any]) -> str:
  return f'{row["mean"]:.3g} [{row["ci95_low"]:.3g}, {row["ci95_high"]:.3g}]'


# ----------------------------------------------------------------------------- files

def check_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
  """Refuses a file, or a non-empty folder unless `overwrite` (report files are replaced)."""
  out = Path(out_dir)
  if out.exists() and not out.is_dir():
    raise ProgressionError(f'{out}: output path is a file; give a folder for the report')
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    raise ProgressionError(f'{out}: output folder is not empty; choose another folder or '
                           'pass --overwrite (overwrite=True) to replace the report there')
  return out


def write_report(out_dir: str | Path, evaluation: Evaluation, summary: pd.DataFrame,
                 context: Mapping[str, Any], overwrite: bool = False,
                 extra_json: Mapping[str, Any] | None = None,
                 extra_tables: Mapping[str, pd.DataFrame] | None = None) -> dict[str, Path]:
  """Writes `REPORT_FILES` (+ `extra_json` files).

  comparisons.csv is `comparisons.paired_comparisons(evaluation.rows)` (the model against
  every other method, subject-level paired bootstrap; empty without a 'model' method); the
  HTML and markdown reports show its "Who wins" table for the headline regions.

  Each file is rendered in memory, then the set is written all or nothing by
  `io.write_folder` (staged beside `out_dir`, moved in with report.md last), so a
  crash or kill -9 leaves only complete files, and report.md only beside a complete report.

  Args:
    out_dir: the report folder (created; must be empty unless `overwrite`).
    evaluation, summary: from `evaluate_pairs` and `summarize`.
    context: what was evaluated (checkpoint, cohort, split, ...), shown at the top.
    extra_json: file name -> JSON-able object (e.g. the fitted population rates).
    extra_tables: title -> table appended to the HTML page.

  Returns:
    file name -> path.
  """
  out = check_output_dir(out_dir, overwrite)
  headline = headline_table(summary, evaluation.volume_method)
  regions = HEADLINE_REGIONS[evaluation.volume_method]
  paired = comparisons.paired_comparisons(evaluation.rows)
  who_wins = comparisons.who_wins_table(paired, regions)
  references = [m for m in evaluation.methods if m in comparisons.REFERENCE_METHODS]
  texts = {name: json.dumps(value, indent=2) + '\n'
           for name, value in (extra_json or {}).items()}
  texts['pairs.csv'] = evaluation.rows.to_csv(index=False, float_format='%.8g')
  texts['summary.csv'] = summary.to_csv(index=False, float_format='%.8g')
  texts['comparisons.csv'] = paired.to_csv(index=False, float_format='%.8g')
  texts['report.html'] = figures.render_html(
      evaluation.rows, evaluation.examples, evaluation.methods, summary, headline, context,
      regions, extra_tables, who_wins=who_wins, references=references)
  texts['report.md'] = figures.render_markdown(headline, context, evaluation.volume_method,
                                               who_wins=who_wins, references=references)
  writers = {name: functools.partial(_write_text, text=text) for name, text in texts.items()}
  return dict(zip(texts, io.write_folder(out, writers)))


def _write_text(path: Path, text: str) -> None:
  path.write_text(text)
