"""One error type for everything a user can cause and fix: :class:`MedmtlError` and its subclasses.

The command line catches exactly :class:`MedmtlError`, prints its message on one line and exits with
status 2. Every message names the file, series, config key or URI at fault and says what to do. Any other
exception is a bug in medmtl and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "MedmtlError", "ConfigError", "InputError", "DataError", "IngestError", "TrainingError", "TrackingError",
    "ModelError",
]


class MedmtlError(Exception):
    """Base of every user-facing medmtl error: the message alone tells the user what is wrong and what to do."""


class ConfigError(MedmtlError, ValueError):
    """A config file or override is invalid (names the file and the dotted key)."""


class InputError(MedmtlError):
    """A file or folder given on the command line is missing, unreadable or of the wrong kind."""


class DataError(MedmtlError):
    """An ingested dataset (manifest, images, labels, plan) does not fit what a run needs."""


class IngestError(MedmtlError):
    """A scanner export or nnU-Net raw dataset cannot be ingested as asked (names the path or series)."""


class TrainingError(MedmtlError):
    """Training cannot start or continue (checkpoint, output folder, disk, distributed set-up)."""


class TrackingError(MedmtlError):
    """The MLflow tracking server or registry refused or could not be reached (names the URI)."""


class ModelError(MedmtlError):
    """A model URI, version or alias cannot be resolved, or a model's files do not verify."""
