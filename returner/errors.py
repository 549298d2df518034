"""One hierarchy: permanent errors are the task's fault, transient ones are the world's."""

from __future__ import annotations


class ReturnerError(Exception):
    """Base of every error the service raises on purpose."""


class SettingsError(ReturnerError):
    """A setting has a bad value; start-up stops with this one line."""


class PermanentError(ReturnerError):
    """The task itself is bad: record it as failed and dead-letter it at once."""


class BadTask(PermanentError):
    """The message cannot be read as a task (JSON, fields, types, shape, dtype, order)."""


class BadFrame(PermanentError):
    """The shared-memory segment is missing or does not match the message."""


class MissingSegment(BadFrame):
    """The segment does not exist: often a renderer whose resource tracker unlinked it."""


class TransientError(ReturnerError):
    """The world is failing (Redis, disk): keep the task pending and back off."""


class RedisUnavailable(TransientError):
    """Redis could not be reached or answered with an error."""


class DiskError(TransientError):
    """Writing to OUTPUT_DIR failed (full disk, I/O error); the worker pauses."""


class ObjectStoreUnavailable(TransientError):
    """The object store could not be reached, timed out, throttled or answered with an
    error; the worker pauses as on a failing disk. `kind` says which, for the metric:
    unreachable, timeout, throttled or refused."""

    def __init__(self, message: str, kind: str = "unreachable") -> None:
        super().__init__(message)
        self.kind = kind
