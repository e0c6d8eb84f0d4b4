"""The errors a user can cause, as opposed to bugs: engine.cli.run prints any UserError as one `error:` line
and exits non-zero; everything else keeps its traceback.

This module is the bottom of the project's dependency order (scripts -> models, datasets -> engine): the
error types of the layers above subclass UserError (CheckpointError in engine.checkpoint, DataError here,
models.losses.MissingWeightsError, ...), so the engine names no class of theirs.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user asked for cannot be done; the message is one line that says what to do."""


class UsageError(UserError, ValueError):
    """A flag combination that cannot work."""


class DataError(UserError, ValueError):
    """A problem with the data the user can fix (wrong path, empty folder, missing flag, too few shards)."""
