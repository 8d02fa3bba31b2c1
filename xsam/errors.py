"""Errors a training run raises for reasons that a retry cannot fix.

The agent classifies failures by these types: an `XsamError` (bad config, missing data, a model
that cannot be built, a diverged run) ends the job `failed` with no retry; anything that kills a
process or node is retried from the latest checkpoint while attempts remain. Each carries a
stable ``code`` that the service shows as the job's ``error.type``.
"""

from __future__ import annotations


class XsamError(Exception):
    """A training run failed for a reason a retry cannot fix."""

    code = "training_error"


class ConfigurationError(XsamError, ValueError):
    """The run's configuration cannot be used (e.g. options a model does not accept).

    The one error type for a bad configuration: `xsam.config.load_config` raises it for a file
    that cannot be read or validated, and training raises it for what only shows at run time.
    A ValueError too, as a bad value is.
    """

    code = "invalid_config"


class DataError(XsamError):
    """The data set is missing, unreadable or not in the expected layout."""

    code = "data_error"


class ModelError(XsamError):
    """The model cannot be built for this data set."""

    code = "model_error"


class DivergedError(XsamError):
    """The loss became NaN or infinite; the message names the step."""

    code = "diverged"


class StorageError(XsamError):
    """A checkpoint, the run's report file or the trained weights cannot be written (a path that
    is a file, a read-only or full file system, no permission); the message names the path and
    the reason. The same storage fails the next attempt the same way, so it is not retried."""

    code = "storage_error"

    @classmethod
    def writing(cls, path: object, exc: BaseException) -> StorageError:
        """The error for a failed write of ``path``: the path and the system's reason."""
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
        return cls(f"cannot write {path}: {reason}{where}"[:2000])
