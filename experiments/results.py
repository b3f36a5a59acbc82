"""Regenerates RESULTS.md from evaluation report folders (what `experiments.evaluate` wrote).

  python -m experiments.results --report=/runs/std_report --workdir=/runs/std \
      --command="python -m experiments.train ..." --out=RESULTS.md

The flags; the tables and text are `experiments.results_tables`. Intentionally short: it
only reads the files; nothing is recomputed.
"""

from pathlib import Path

from absl import app, flags

from experiments import common
from experiments.results_tables import render

_REPORT = flags.DEFINE_string('report', None, 'Evaluation report folder (summary.csv, ...).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (metrics.jsonl), optional.')
_COMMAND = flags.DEFINE_string('command', '', 'The commands that produced the run, quoted.')
_CURVE = flags.DEFINE_string('learning_curve', None,
                             'CSV of `experiments.learning_curve`, optional.')
_CURVE_COMMAND = flags.DEFINE_string('learning_curve_command', '',
                                     'The command that produced the learning curve.')
_ROBUSTNESS = flags.DEFINE_list(
    'robustness', [], 'Report folders, the reference then one or more changed runs (e.g. the '
    'same cohort without and with head motion), each compared with the reference region by '
    'region; optional.')
_ROBUSTNESS_COMMAND = flags.DEFINE_string('robustness_command', '',
                                          'The commands that produced the reports.')
_T1W_ONLY = flags.DEFINE_string(
    't1w_only', None, 'Report folder of `experiments.evaluate --volume_method=tissue` on the '
    'same checkpoint (forecasts without label maps), optional.')
_T1W_ONLY_COMMAND = flags.DEFINE_string('t1w_only_command', '',
                                        'The command that produced the T1w-only report.')
_OUT = flags.DEFINE_string('out', 'RESULTS.md', 'Markdown file to (re)write.')
flags.mark_flag_as_required('report')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  text = render(Path(_REPORT.value), Path(_WORKDIR.value) if _WORKDIR.value else None,
                _COMMAND.value, Path(_CURVE.value) if _CURVE.value else None,
                _CURVE_COMMAND.value, _ROBUSTNESS.value, _ROBUSTNESS_COMMAND.value,
                Path(_T1W_ONLY.value) if _T1W_ONLY.value else None, _T1W_ONLY_COMMAND.value)
  out = Path(_OUT.value)  # Written beside, then renamed: never half-written.
  tmp = out.with_name(f'.{out.name}.tmp')
  tmp.write_text(text)
  tmp.replace(out)
  print(text)


if __name__ == '__main__':
  common.run(main)
