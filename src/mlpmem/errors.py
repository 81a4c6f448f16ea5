"""The errors with a message that says what to do. The CLI prints that message as one line and exits with code 2 for
a :class:`UserError` (settings, inputs, a stale or locked run) and 1 for the machine's (:class:`DiskSpaceError`, and
any other OSError: permissions, ...); anything else is a bug (exit 1, traceback with -v). Each class also derives
from the builtin a caller would naturally catch."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the input, the settings or the run directory; the message says what to do."""


class ConfigError(UserError, ValueError):
    """A configuration value is missing, of the wrong type or out of range. The message names the flag."""


class StageError(UserError, RuntimeError):
    """An artifact is missing, incomplete, stale, corrupt or was made with other settings; says what to rerun."""


class CorpusError(UserError, ValueError):
    """The corpus given by --data.source cannot be read or is empty."""


class ModelLoadError(UserError, ValueError):
    """The model or tokenizer named by --model.name could not be loaded."""


class AssetError(UserError, RuntimeError):
    """An offline default asset could not be downloaded or read."""


class DiskSpaceError(OSError):
    """The machine's, not a UserError (exit 1, like every OSError): not enough free space for an output (checked up
    front for outputs of known size, or a write that failed on a full disk, a quota or a file-size limit); the stage
    resumes once space is freed."""


class RunLockedError(StageError):
    """Another mlpmem process is writing the same run directory."""


class DivergedError(StageError):
    """Training produced a non-finite loss or gradient norm."""
