"""Process pools for the CPU-bound numpy stages (phantom synthesis, preprocessing).

One place decides how worker processes start: `fork` while the parent runs no other
threads, else `spawn` (JAX's thread pools do not survive a fork). Spawned workers do not
re-import the caller's main script: the jobs are module-level functions of `progression`,
and a script without an `if __name__ == '__main__':` guard (or a notebook) must not be run
again in every worker.
"""

import contextlib
import multiprocessing
import os
import sys
import threading
import types
from typing import Callable, Iterable, Iterator, TypeVar

Job = TypeVar('Job')
Result = TypeVar('Result')


def available_cpus(limit: int = 8) -> int:
  """CPUs this process may run on, at most `limit`."""
  return max(1, min(len(os.sched_getaffinity(0)), limit))


def map_unordered(fn: Callable[[Job], Result], jobs: Iterable[Job],
                  workers: int) -> Iterator[Result]:
  """Yields fn(job) for every job, in `workers` processes when > 1 (completion order).

  `fn` must be a module-level function of an importable module and the jobs picklable.
  """
  jobs = list(jobs)
  if workers <= 1 or len(jobs) <= 1:
    yield from map(fn, jobs)
    return
  forkable = 'jax' not in sys.modules and threading.active_count() == 1 and (
      'fork' in multiprocessing.get_all_start_methods())
  context = multiprocessing.get_context('fork' if forkable else 'spawn')
  with _main_hidden():  # Only while the workers start: the caller's main is back after.
    pool = context.Pool(min(workers, len(jobs)))
  with pool:
    yield from pool.imap_unordered(fn, jobs)


@contextlib.contextmanager
def _main_hidden():
  """Starts processes while `__main__` looks like an empty module, so spawn skips it."""
  main = sys.modules['__main__']
  sys.modules['__main__'] = types.ModuleType('__main__')
  try:
    yield
  finally:
    sys.modules['__main__'] = main
