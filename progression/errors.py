"""The one exception type for errors a user can fix (bad files, rows, fields, flags).

Anything raised as `ProgressionError` is reported by the command-line tools as a
single line (no traceback) and a non-zero exit code; every other exception is a
bug and keeps its traceback.
"""


class ProgressionError(Exception):
  """A user-facing error whose message names the file, row or field at fault."""
