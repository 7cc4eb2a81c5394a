"""Errors a person can fix, told apart from bugs.

Everything raised at the boundary (a config field, a flag, a path, a file, a
checkpoint) is a `UserError` whose message names the value, what is allowed
and the fix. The entry points (`monoformer_jax.cli.run`) print such an error
as one line, with its cause chain, instead of a traceback (`--verbose` shows
the traceback); anything else is a bug and keeps its traceback.

Each kind also derives from the built-in exception it refines, so callers that
catch `ValueError` or `FileNotFoundError` keep working.
"""


class UserError(Exception):
  """Caused by the input, fixable by the person who gave it."""


class ConfigError(UserError, ValueError):
  """A config field or a flag with a value that cannot work."""


class MissingPathError(UserError, FileNotFoundError):
  """A file or folder the input names is not there."""


class PathError(UserError, OSError):
  """A path that is there but cannot be used (a file for a folder, read-only, full)."""


class FileFormatError(UserError, ValueError):
  """A file that is not what its name says (a broken safetensors, config.json, image)."""


class CheckpointError(UserError, ValueError):
  """A checkpoint that cannot be read, or that does not match the model asked for."""


class TrainingDiverged(UserError, FloatingPointError):
  """A non-finite loss or gradient; the last good state is kept."""


class DoesNotFitError(UserError, MemoryError):
  """A step that needs more accelerator memory than the chips have."""


class NotInstalledError(UserError, ImportError):
  """An optional dependency that the request needs is not installed."""
