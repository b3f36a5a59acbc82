"""Evaluates a trained generator against real follow-ups, beside the no-change and
population-rate baselines.

  python -m experiments.evaluate --workdir=/tmp/w --cohort=synthetic \
      --cohort_root=/data/cohort --split=test --out=/tmp/report [--overwrite]

`--checkpoint=DIR` (a `checkpoints/` folder) may replace `--workdir`; `--cohort` and
`--cohort_root` default to the checkpoint's. The training split is reproduced from the
checkpoint's config (cohort.split_fractions, cohort.split_seed); the population-rate
baseline is fitted on its train split. Writes pairs.csv, summary.csv, report.html and
report.md (see progression.evaluation.report) plus population_rates.json into --out.
The logic is `progression.evaluation.pipeline.evaluate_checkpoint`, which a notebook can
call the same way.
"""

from absl import app, flags

from experiments import common
from progression import cohort
from progression.errors import ProgressionError
from progression.evaluation import figures
from progression.evaluation.pipeline import evaluate_checkpoint

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir holding checkpoints/.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'A checkpoints/ folder (instead of '
                                  '--workdir).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_COHORT = flags.DEFINE_string('cohort', None, 'Cohort spec name or .toml path (default: the '
                              "checkpoint's).")
_COHORT_ROOT = flags.DEFINE_string('cohort_root', None, "Cohort folder (default: the "
                                   "checkpoint's).")
_SPLIT = flags.DEFINE_enum('split', 'test', cohort.SPLITS, 'Which split to evaluate.')
_OUT = flags.DEFINE_string('out', None, 'Report folder (absent or empty unless --overwrite).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace the report in a non-empty --out.')
_EXAMPLES = flags.DEFINE_integer('examples', 2, 'Pairs shown as example slices.')
_VOLUME_METHOD = flags.DEFINE_enum(
    'volume_method', None, ['labels', 'tissue'],
    'How volumes are measured (default: labels when every pair has label maps). "tissue" on a '
    'labelled cohort evaluates T1w-only forecasts: brain, GM, WM and CSF of the tissue model.')
flags.mark_flag_as_required('out')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if (_WORKDIR.value is None) == (_CHECKPOINT.value is None):
    raise ProgressionError('give exactly one of --workdir or --checkpoint')
  common.log_devices()
  outputs = evaluate_checkpoint(
      _WORKDIR.value or _CHECKPOINT.value, _OUT.value, split=_SPLIT.value,
      cohort_spec=_COHORT.value, cohort_root=_COHORT_ROOT.value, overwrite=_OVERWRITE.value,
      step=_STEP.value, num_examples=_EXAMPLES.value, volume_method=_VOLUME_METHOD.value)
  print(f'report: {outputs.files["report.html"].absolute()}')
  print(figures.markdown_table(outputs.headline))


if __name__ == '__main__':
  common.run(main)
