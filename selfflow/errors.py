"""The errors a user can cause (bad config, data, checkpoint, a diverged run): one line each, exit 2."""
from __future__ import annotations


def _user_errors() -> tuple[type[BaseException], ...]:
    from selfflow.checkpoint import CheckpointError
    from selfflow.config import ConfigError
    from selfflow.data import DataError
    from selfflow.trainer import TrainingDiverged

    return (ConfigError, CheckpointError, DataError, TrainingDiverged)




USER_ERRORS = _user_errors()
