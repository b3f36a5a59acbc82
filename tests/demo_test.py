"""The README demo, shrunk (8 subjects at 32^3, tiny config): runs end to end, then continues."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _demo(workdir: Path) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, '-m', 'experiments.demo', f'--workdir={workdir}', '--subjects=8',
       '--cohort_shape=32,32,32', '--cohort_voxel_mm=4', '--config=experiments/configs/tiny.py'],
      cwd=REPO, capture_output=True, text=True, timeout=900)


def test_demo_runs_end_to_end_and_a_rerun_continues(tmp_path):
  first = _demo(tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  for stage in ('[1/4]', '[2/4]', '[3/4]', '[4/4]'):
    assert stage in first.stdout
  report = tmp_path / 'report/report.html'
  assert str(report) in first.stdout and report.is_file()
  assert '| model |' in first.stdout and '| no_change |' in first.stdout
  assert (tmp_path / 'forecast/volumes.csv').is_file()
  assert len(list((tmp_path / 'forecast').glob('*_forecast-*_T1w.nii.gz'))) == 3
  train_records = (tmp_path / 'train/metrics.jsonl').read_text().splitlines()
  cohort_stamp = (tmp_path / 'cohort/participants.tsv').stat().st_mtime_ns

  second = _demo(tmp_path)
  assert second.returncode == 0, second.stderr[-3000:]
  # Training had finished: the rerun trains no step and keeps the cohort.
  assert (tmp_path / 'train/metrics.jsonl').read_text().splitlines() == train_records
  assert (tmp_path / 'cohort/participants.tsv').stat().st_mtime_ns == cohort_stamp
  assert json.loads(train_records[-1])['step'] == 6
