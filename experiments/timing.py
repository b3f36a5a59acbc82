"""Wall-clock timing shared by the benchmark and the PyTorch comparator (no jax, no flags)."""

import statistics
import time
from typing import Any, Callable


def time_calls(fn: Callable[[], Any], repetitions: int, warmup: int) -> dict[str, Any]:
  """Times `fn` (which must block until its result is ready).

  Returns {'first_call_s', 'median_s', 'min_s', 'times_s'} in seconds: the first call
  apart, then `warmup - 1` more untimed calls, then `repetitions` timed ones.
  """
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  for _ in range(max(warmup - 1, 0)):
    fn()
  times = []
  for _ in range(max(repetitions, 1)):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return {'first_call_s': first, 'median_s': statistics.median(times), 'min_s': min(times),
          'times_s': times}
