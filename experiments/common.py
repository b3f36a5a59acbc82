"""What every launcher shares: user errors as one line + exit 1, and a device banner."""

import sys
from typing import Callable, Sequence

import jax
from absl import app, logging

from progression.errors import ProgressionError


def run(main: Callable[[Sequence[str]], None]) -> None:
  """`absl.app.run(main)`, printing a ProgressionError as one line (no traceback), exit 1."""

  def guarded(argv: Sequence[str]) -> None:
    try:
      main(argv)
    except ProgressionError as e:
      print('error: ' + ' '.join(str(e).split()), file=sys.stderr)  # Always one line.
      sys.exit(1)

  app.run(guarded)


def log_devices() -> None:
  logging.info('JAX process %d/%d, local devices: %s', jax.process_index(),
               jax.process_count(), jax.local_devices())
