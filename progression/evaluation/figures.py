"""Report rendering: matplotlib figures as base64 PNG, the self-contained HTML page and the
markdown summary.

Uses `matplotlib.figure.Figure` directly (no pyplot, so no global state and no GUI backend).
The page embeds every figure as `<img src="data:image/png;base64,...">` and its CSS inline:
it references no other file and can be mailed or archived alone.
"""

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

_COLORS = ('#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b')
_CSS = ('body{font-family:sans-serif;margin:2em;max-width:1400px}'
        'table{border-collapse:collapse;margin:1em 0;font-size:13px}'
        'th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}'
        'th{background:#f2f2f2}img{max-width:100%}h2{margin-top:1.6em}')
REFERENCE_NOTE = ('oracle applies each subject\'s true rates; expected applies the rate '
                  'expected from what is observable at baseline (the best any forecaster can '
                  'do); they are references, not competitors.')
WHO_WINS_NOTE = (
    'The model against each competitor, subject by subject: the difference of absolute errors '
    '(model minus competitor) is averaged over each subject\'s pairs, then over subjects (each '
    'subject weighs the same, also in the MAE ratio); the 95 % CI resamples subjects with '
    'replacement (paired bootstrap). better: the whole CI is below 0 (the model\'s errors are '
    'smaller); worse: the whole CI is above 0; tie: the CI contains 0. All comparisons, '
    'references included: comparisons.csv.')
NO_MODEL_NOTE = 'No method named model was evaluated: nothing to compare.'


def png_base64(fig: Figure, dpi: int = 90) -> str:
  """The figure as a base64-encoded PNG string."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=dpi)
  return base64.b64encode(buffer.getvalue()).decode('ascii')


def change_scatter(rows: pd.DataFrame, methods: Sequence[str]) -> Figure:
  """Predicted vs true volume change (mL) per region, one colour per method."""
  regions = list(pd.unique(rows['region']))
  ncols = min(4, len(regions))
  nrows = math.ceil(len(regions) / ncols)
  fig = Figure(figsize=(3.4 * ncols, 3.1 * nrows), layout='constrained')
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  for ax, region in zip(axes, regions):
    sub = rows[rows['region'] == region]
    for color, method in zip(_COLORS, methods):
      part = sub[sub['method'] == method]
      ax.scatter(part['true_change_ml'], part['predicted_change_ml'], s=14, alpha=0.75,
                 color=color, label=method)
    values = np.concatenate([sub['true_change_ml'], sub['predicted_change_ml']])
    lo, hi = (float(np.nanmin(values)), float(np.nanmax(values))) if values.size else (0, 1)
    pad = 0.05 * (hi - lo) or 1e-3
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color='gray', lw=0.8, ls='--')
    ax.set_title(region, fontsize=10)
    ax.set_xlabel('true change (mL)', fontsize=8)
    ax.set_ylabel('predicted change (mL)', fontsize=8)
    ax.tick_params(labelsize=7)
    ax.locator_params(nbins=5)
  for ax in axes[len(regions):]:
    ax.set_visible(False)
  axes[0].legend(fontsize=7)
  return fig


def error_by_interval(rows: pd.DataFrame, methods: Sequence[str],
                      regions: Sequence[str]) -> Figure:
  """Absolute volume error (mL) against the interval (years): pairs as dots, mean as line."""
  regions = [r for r in regions if r in set(rows['region'])]
  fig = Figure(figsize=(3.8 * max(len(regions), 1), 3.2), layout='constrained')
  axes = fig.subplots(1, max(len(regions), 1), squeeze=False).ravel()
  for ax, region in zip(axes, regions):
    sub = rows[rows['region'] == region]
    for color, method in zip(_COLORS, methods):
      part = sub[sub['method'] == method]
      ax.scatter(part['interval_years'], part['abs_error_ml'], s=10, alpha=0.35, color=color)
      means = part.groupby(part['interval_years'].round(2))['abs_error_ml'].mean()
      ax.plot(means.index, means.to_numpy(), marker='o', color=color, label=method)
    ax.set_title(region, fontsize=10)
    ax.set_xlabel('interval (years)', fontsize=8)
    ax.set_ylabel('absolute error (mL)', fontsize=8)
    ax.tick_params(labelsize=7)
  axes[0].legend(fontsize=7)
  return fig


def example_slices(example: Any, methods: Sequence[str]) -> Figure:
  """Rows = methods; columns = baseline, predicted, real follow-up, predicted - real.

  `example` is a `report.ExampleSlices` (coronal `[x, z]` slices, normalised intensities).
  """
  diffs = {m: example.predicted[m] - example.real for m in methods}
  limit = max([float(np.abs(d).max()) for d in diffs.values()] + [1e-6])
  fig = Figure(figsize=(9.0, 2.4 * len(methods)), layout='constrained')
  axes = fig.subplots(len(methods), 4, squeeze=False)
  for i, method in enumerate(methods):
    panels = ((example.baseline, 'baseline'), (example.predicted[method], 'predicted'),
              (example.real, 'real follow-up'), (diffs[method], 'predicted - real'))
    for j, (data, title) in enumerate(panels):
      ax = axes[i, j]
      if j < 3:
        ax.imshow(data.T, origin='lower', cmap='gray', vmin=0.0, vmax=1.2)
      else:
        ax.imshow(data.T, origin='lower', cmap='RdBu_r', vmin=-limit, vmax=limit)
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(title, fontsize=9)
    axes[i, 0].set_ylabel(method, fontsize=9)
  fig.suptitle(example.title, fontsize=10)
  return fig


def summary_pivot(summary: pd.DataFrame, grouping: str,
                  metrics: Sequence[str] | None = None,
                  regions: Sequence[str] | None = None) -> pd.DataFrame:
  """Summary rows of one grouping as a table: (group, region, metric) x method cells."""
  part = summary[summary['grouping'] == grouping]
  if metrics is not None:
    part = part[part['metric'].isin(metrics)]
  if regions is not None:
    part = part[part['region'].isin(regions)]
  part = part.assign(cell=[f'{m:.4g} [{lo:.4g}, {hi:.4g}] (n={n})' for m, lo, hi, n in
                           zip(part['mean'], part['ci95_low'], part['ci95_high'], part['n'])])
  keys = ['group', 'region', 'metric']
  table = part.pivot_table(index=keys, columns='method', values='cell', aggfunc='first',
                           sort=False)
  methods = [m for m in pd.unique(part['method']) if m in table.columns]
  return table[methods].reset_index().rename_axis(columns=None)


def render_html(rows: pd.DataFrame, examples: Sequence[Any], methods: Sequence[str],
                summary: pd.DataFrame, headline: pd.DataFrame, context: Mapping[str, Any],
                headline_regions: Sequence[str],
                tables: Mapping[str, pd.DataFrame] | None = None,
                who_wins: pd.DataFrame | None = None,
                references: Sequence[str] = ()) -> str:
  """The self-contained report page (tables + embedded PNG figures) as an HTML string.

  `headline` is `report.headline_table`; `who_wins` (optional) is
  `comparisons.who_wins_table`, shown after it; `references`: the reference methods
  evaluated (`comparisons.REFERENCE_METHODS`), which add `REFERENCE_NOTE`.
  """
  parts = ['<h1>Forecast evaluation</h1>', _context_table(context),
           '<h2>Model vs baselines</h2>',
           '<p>Mean absolute error of the follow-up volume (mL) and of the annualised change '
           '(compound percent/year) over all pairs, with 95 % bootstrap CIs (pairs resampled);'
           ' "MAE / baseline": each method\'s MAE as a fraction of that baseline\'s.</p>',
           _table(headline)]
  if references:
    parts.append(f'<p>{html.escape(REFERENCE_NOTE)}</p>')
  if who_wins is not None:
    parts += ['<h2>Who wins</h2>', f'<p>{html.escape(WHO_WINS_NOTE)}</p>',
              _table(who_wins) if len(who_wins) else f'<p>{html.escape(NO_MODEL_NOTE)}</p>']
  parts += ['<h2>Predicted vs true volume change</h2>', _img(change_scatter(rows, methods)),
           '<h2>Error by interval</h2>',
           _img(error_by_interval(rows, methods, headline_regions)),
           '<h2>Examples (coronal slices)</h2>']
  parts += [_img(example_slices(e, methods)) for e in examples]
  key_metrics = ('abs_error_ml', 'abs_rate_error_pct_per_year', 'abs_percent_error')
  parts += ['<h2>All pairs</h2>', _table(summary_pivot(summary, 'all')),
            '<h2>By baseline diagnosis</h2>',
            _table(summary_pivot(summary, 'diagnosis', key_metrics, headline_regions)),
            '<h2>By interval</h2>',
            _table(summary_pivot(summary, 'interval', key_metrics, headline_regions))]
  for title, table in (tables or {}).items():
    parts += [f'<h2>{html.escape(title)}</h2>', _table(table)]
  body = '\n'.join(parts)
  return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Forecast evaluation'
          f'</title><style>{_CSS}</style></head><body>\n{body}\n</body></html>\n')


def markdown_table(table: pd.DataFrame) -> str:
  """A GitHub-flavoured markdown pipe table of a small DataFrame."""
  lines = ['| ' + ' | '.join(str(c).replace('|', '/') for c in table.columns) + ' |',
           '|' + '|'.join('---' for _ in table.columns) + '|']
  lines += ['| ' + ' | '.join(str(v).replace('|', '/') for v in row) + ' |'
            for row in table.itertuples(index=False)]
  return '\n'.join(lines)


def render_markdown(headline: pd.DataFrame, context: Mapping[str, Any],
                    volume_method: str, who_wins: pd.DataFrame | None = None,
                    references: Sequence[str] = ()) -> str:
  """report.md: the context, the headline table (`report.headline_table`) and, when given,
  the "Who wins" table (`comparisons.who_wins_table`); `references` as in `render_html`."""
  items = '\n'.join(f'- {k}: {v}' for k, v in context.items())
  parts = [f'# Forecast evaluation\n\n{items}\n\n'
           '## Model vs baselines\n\n'
           'Mean absolute error of the follow-up volume (mL) and of the annualised volume '
           'change (compound percent/year), over all pairs, with 95 % bootstrap confidence '
           f'intervals (pairs resampled); volumes from {volume_method}. "MAE / baseline": '
           "each method's MAE as a fraction of that baseline's.\n\n"
           f'{markdown_table(headline)}\n\n']
  if references:
    parts.append(f'{REFERENCE_NOTE}\n\n')
  if who_wins is not None:
    table = markdown_table(who_wins) if len(who_wins) else NO_MODEL_NOTE
    parts.append(f'## Who wins\n\n{WHO_WINS_NOTE}\n\n{table}\n\n')
  parts.append('Per pair x region x method: pairs.csv; grouped by diagnosis and interval: '
               'summary.csv; model vs every method: comparisons.csv; figures: report.html.\n')
  return ''.join(parts)


def _img(fig: Figure) -> str:
  return f'<img alt="figure" src="data:image/png;base64,{png_base64(fig)}">'


def _table(table: pd.DataFrame) -> str:
  return table.to_html(index=False, border=0, escape=True, na_rep='', float_format='%.4g')


def _context_table(context: Mapping[str, Any]) -> str:
  return _table(pd.DataFrame({'': [str(k) for k in context],
                              'value': [str(v) for v in context.values()]}))
