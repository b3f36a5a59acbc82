"""Regional volumes of visits, measured once per experiment and kept beside its checkpoints.

The tissue model segments ~1 visit/s at 2 mm. Training measures every training visit's
tissue volumes (the tissue-model fallback of `train.fit_tissue_fallback`) and
`evaluate --volume_method=tissue` needs the same volumes again for the population rates:
training keeps what it measured in `<workdir>/visit_volumes.json`, and evaluation reads it
(never writes it) and measures only the visits it lacks. An entry is keyed by the volume
method and the path, size and modification time of the file measured (the label map for
'labels', the image for 'tissue'), so an edited or replaced file is measured afresh.
"""

import json
import os
from collections.abc import Mapping
from pathlib import Path

from absl import logging

from progression import io

FILE_NAME = 'visit_volumes.json'


def file_in(workdir: str | Path) -> Path:
  """Where the training run in `workdir` keeps its measured volumes."""
  return Path(workdir) / FILE_NAME


class VisitVolumes:
  """Measured volumes (region -> mL) of visits' files, read from and saved to a JSON file.

  Args:
    path: the JSON file (need not exist); None keeps the volumes in memory only.
    writable: whether `save` writes new entries to `path` (False for a run that only reads
      another run's measurements).
  """

  def __init__(self, path: str | Path | None, writable: bool = True):
    self.path = None if path is None else Path(path)
    self.writable = writable
    self._entries = self._read()
    self._unsaved = 0

  def _read(self) -> dict[str, dict[str, float]]:
    if self.path is None or not self.path.is_file():
      return {}
    try:
      entries = json.loads(self.path.read_text())['visits']
      return {str(k): {str(r): float(v) for r, v in volumes.items()}
              for k, volumes in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      logging.warning('%s: unreadable (%s: %s); its visits are measured again', self.path,
                      type(e).__name__, e)
      return {}

  @staticmethod
  def key(volume_method: str, measured_file: str | Path) -> str | None:
    """The entry of `measured_file` measured by `volume_method`: path, size and mtime
    (None when the file cannot be read: loading it then raises the error that names it)."""
    try:
      stat = os.stat(measured_file)
    except OSError:
      return None
    return f'{volume_method}:{Path(measured_file).absolute()}:{stat.st_size}:{stat.st_mtime_ns}'

  def get(self, key: str) -> dict[str, float] | None:
    return self._entries.get(key)

  def put(self, key: str, volumes_ml: Mapping[str, float]) -> None:
    self._entries[key] = {r: float(v) for r, v in volumes_ml.items()}
    self._unsaved += 1

  def save(self) -> None:
    """Writes the entries (atomically) when writable and something new was measured."""
    if self.path is None or not self.writable or not self._unsaved:
      return
    io.write_text_atomic(self.path, json.dumps({'visits': self._entries}))
    self._unsaved = 0
