"""Every error a user can cause, in one leaf module (it imports nothing from selfflow).

Each is reported by the command line as one line naming the file, key or value, with exit status 2.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem; the message names the key (``train.lr``) and the bad value."""


class DataError(ValueError):
    """A data set could not be read: the message names the file (or key) and what is wrong."""


class FetchError(DataError):
    """A file could not be downloaded and verified from any mirror."""


class ShardError(DataError):
    """A generated set could not be written or read; the message names the file."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; no checkpoint was written for that state."""


class RequestError(ValueError):
    """A bad request to ``selfflow serve``: answered with an HTTP 4xx status and this one line."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, CheckpointError, TrainingDiverged)
