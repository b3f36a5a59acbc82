"""orbax checkpoints: the train state plus JSON metadata (config, cohort, grid, normaliser).

A checkpoint holds everything needed to resume training or to forecast: the state
(params, optimiser state, step) and `metadata` (the experiment config as JSON, the
cohort spec and root, the covariate normaliser fitted on the training split, the
package version). Saves are asynchronous; an unfinished save stays a
`*.orbax-checkpoint-tmp*` folder that is ignored (and cleaned) so the last finished
step is what restores after a crash or `kill -9`.
"""

import json
import logging
import sys
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from progression.errors import ProgressionError

CHECKPOINT_SUBDIR = 'checkpoints'
FORMAT_VERSION = 1  # Bump when the saved state or metadata layout changes.


def checkpoint_dir(workdir: str | Path) -> Path:
  return Path(workdir).absolute() / CHECKPOINT_SUBDIR


def folder_of(checkpoint: str | Path) -> Path:
  """The folder of checkpoint steps, given a training workdir or that folder itself."""
  sub = Path(checkpoint) / CHECKPOINT_SUBDIR
  return sub if sub.is_dir() else Path(checkpoint)


def workdir_of(checkpoint: str | Path) -> Path:
  """The training workdir, given it or its checkpoints/ folder (what else training wrote
  there, e.g. `evaluation.visit_volumes`, is found from it)."""
  path = Path(checkpoint)
  return path.parent if path.name == CHECKPOINT_SUBDIR else path


class Checkpointer:
  """Thin wrapper over `orbax.checkpoint.CheckpointManager` with our two items."""

  def __init__(self, directory: str | Path, keep: int = 3, asynchronous: bool = True,
               read_only: bool = False):
    self.directory = Path(directory).absolute()
    if read_only and not self.directory.is_dir():
      raise ProgressionError(f'{self.directory}: checkpoint directory not found')
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=asynchronous)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=('state', 'metadata'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, metadata: dict[str, Any]) -> None:
    """Starts saving `state` (host arrays, unreplicated) and `metadata` at `step`."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        metadata=ocp.args.JsonSave({**metadata, 'step': int(step),
                                    'format_version': FORMAT_VERSION})))

  def restore(self, state_template: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores the state (shaped like `state_template`) and metadata of `step` (default latest)."""
    step = self._require_step(step)
    _silence_aborted_restore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(state_template),
          metadata=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for damaged folders.
      raise ProgressionError(
          f'{self.directory}/{step}: cannot restore checkpoint (damaged or from another '
          f'model configuration): {type(e).__name__}: {_first_line(e)}') from None
    return restored['state'], dict(restored['metadata'])

  def restore_metadata(self, step: int | None = None) -> dict:
    """Reads only the JSON metadata of `step` (default latest); cheap, no arrays."""
    step = self._require_step(step)
    path = self.directory / str(step) / 'metadata'
    candidates = [path / 'metadata', path] if path.is_dir() else [path]
    for candidate in candidates:
      if candidate.is_file():
        try:
          metadata = json.loads(candidate.read_text())
        except json.JSONDecodeError as e:
          raise ProgressionError(f'{candidate}: checkpoint metadata is not valid JSON: {e}'
                                 ) from None
        _check_version(metadata, candidate)
        return metadata
    raise ProgressionError(f'{path}: checkpoint metadata missing (partial checkpoint?)')

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def _require_step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise ProgressionError(f'{self.directory}: no finished checkpoint found')
    return step


_silenced = False  # Whether `_silence_aborted_restore` ran in this process.


def _silence_aborted_restore() -> None:
  """Filters out the noise a failed orbax restore leaves behind (idempotent, process-wide).

  When one array of a restore fails, orbax closes its event loop while TensorStore still
  holds reads of the other arrays; as those finish, during the restore or as late as
  interpreter exit, their callbacks raise 'Event loop is closed' (printed as unraisable
  exceptions) and asyncio logs 'Task exception was never retrieved' for the failed reads.
  The error that matters becomes our ProgressionError, so exactly these two are dropped.
  """
  global _silenced
  if _silenced:
    return
  _silenced = True
  previous = sys.unraisablehook

  def hook(unraisable):
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == 'Event loop is closed'):
      previous(unraisable)

  sys.unraisablehook = hook
  logging.getLogger('asyncio').addFilter(
      lambda record: not str(record.msg).startswith('Task exception was never retrieved'))


def _first_line(error: Exception, max_chars: int = 200) -> str:
  """The gist of a library error: orbax/TensorStore messages run to dozens of lines."""
  lines = str(error).strip().splitlines() or ['']
  line = lines[0]
  return line if len(line) <= max_chars else line[:max_chars] + '...'


def _check_version(metadata: dict, where: Path) -> None:
  version = metadata.get('format_version')
  if version != FORMAT_VERSION:
    raise ProgressionError(f'{where}: checkpoint format version {version} is not supported '
                           f'(this progression reads version {FORMAT_VERSION})')
