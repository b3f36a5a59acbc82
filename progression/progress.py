"""Progress output for long jobs (evaluation, cache warm-up): one bar, on stderr."""

import sys
import time
from typing import TextIO


class ProgressBar:
  """`progress(done, total)` drawing '[####....] done/total what 12s ETA 30s' on stderr.

  Redraws in place on a terminal; elsewhere (logs, pipes) prints a line per tenth of the work.
  A `done` below the previous call's starts a new pass (e.g. the training split's visits,
  then the validation split's), timed from the previous pass's last call.
  """

  def __init__(self, what: str, stream: TextIO | None = None, width: int = 30):
    self._what, self._stream, self._width = what, stream or sys.stderr, width
    self._start = time.monotonic()
    self._tty = self._stream.isatty()
    self._last_tenth = -1
    self._done, self._last_call = 0, self._start

  def __call__(self, done: int, total: int) -> None:
    now = time.monotonic()
    if done < self._done:
      self._start, self._last_tenth = self._last_call, -1
    self._done, self._last_call = done, now
    tenth = (10 * done) // max(total, 1)
    if not self._tty and tenth == self._last_tenth and done != total:
      return
    self._last_tenth = tenth
    elapsed = now - self._start
    eta = f' ETA {elapsed / done * (total - done):.0f}s' if 0 < done < total else ''
    filled = (self._width * done) // max(total, 1)
    line = (f'[{"#" * filled}{"." * (self._width - filled)}] {done}/{total} {self._what} '
            f'{elapsed:.0f}s{eta}')
    end = '\n' if (done == total or not self._tty) else ''
    self._stream.write(('\r' if self._tty else '') + line + end)
    self._stream.flush()
