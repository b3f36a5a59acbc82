"""ProgressBar: lines per tenth in logs, elapsed time and ETA, a new pass restarting the clock."""

import io

from progression import progress


def test_a_second_pass_restarts_the_clock_and_eta(monkeypatch):
  now = [0.0]
  monkeypatch.setattr(progress.time, 'monotonic', lambda: now[0])
  stream = io.StringIO()
  bar = progress.ProgressBar('visits measured', stream=stream)
  for done in range(1, 11):
    now[0] = 10.0 * done
    bar(done, 10)
  lines = stream.getvalue().splitlines()
  assert len(lines) == 10 and lines[0].endswith('1/10 visits measured 10s ETA 90s')
  assert lines[-1] == '[' + '#' * 30 + '] 10/10 visits measured 100s'
  now[0] = 102.0
  bar(1, 4)  # the next split's visits
  assert stream.getvalue().splitlines()[-1].endswith('1/4 visits measured 2s ETA 6s')
