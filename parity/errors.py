"""Exceptions raised by parity.

Every error that parity raises on purpose is a `ParityError`, so callers can catch
one class. Messages name the bad value and the fix, with both the CLI flag and the
Python argument where they differ.
"""


class ParityError(Exception):
    """Base class of the errors that parity raises on purpose."""


class ConfigError(ParityError, ValueError):
    """An invalid configuration string or configuration value."""


class InputError(ParityError, ValueError):
    """Invalid user input: a data file, a model, an option value."""


class WorkerError(ParityError, RuntimeError):
    """A worker process failed or returned a result that cannot be read."""
