"""The errors a user can fix. The CLI prints their message as one line and exits with code 2; anything else is a
bug (exit 1, traceback with -v). Each class also derives from the builtin a caller would naturally catch."""

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


class DiskSpaceError(UserError, OSError):
    """Not enough free space for an output of known size; the stage resumes once space is freed."""


class RunLockedError(StageError):
    """Another mlpmem process is writing the same run directory."""


class DivergedError(StageError):
    """Training produced a non-finite loss or gradient norm."""
