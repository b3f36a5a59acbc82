"""Metrics to JSONL and TensorBoard event files, without TensorFlow (tensorboardX)."""

import json
import time
from pathlib import Path
from typing import Mapping

import jax


class MetricWriter:
  """Appends `{"step", "split", "time", metrics...}` lines to `metrics.jsonl` and TB scalars.

  Only process 0 writes; other processes get a writer that does nothing.
  """

  def __init__(self, workdir: str | Path, tensorboard: bool = True):
    self._enabled = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if not self._enabled:
      return
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._jsonl = open(workdir / 'metrics.jsonl', 'a', buffering=1)
    if tensorboard:
      from tensorboardX import SummaryWriter  # Imported lazily: start-up stays cheap.
      self._tb = SummaryWriter(str(workdir / 'tensorboard'))

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if not self._enabled:
      return
    values = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({'step': int(step), 'split': split, 'time': time.time(),
                                  **values}) + '\n')
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(f'{split}/{name}', value, int(step))

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
