"""Entry-point glue: user errors end in one line and a non-zero exit; bugs keep their traceback."""
from __future__ import annotations

import os
import sys

from engine.checkpoint import CheckpointError


def user_errors() -> tuple:
    """Exception types that mean 'the user asked for something that cannot be done', not a bug."""
    from datasets import DataError
    from models.losses import MissingWeightsError

    return (CheckpointError, DataError, MissingWeightsError, UsageError)


class UsageError(ValueError):
    """A flag combination that cannot work."""


def run(main, args) -> None:
    """main(args) with user errors as one line; under hfai (one process per node) in one process per GPU."""
    from engine import launch

    found = launch.detect()
    if found.kind == "hfai" and not os.environ.get(launch.SPAWNED_FLAG):
        launch.spawn_per_gpu(found, run, main, args)
        return
    try:
        main(args)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
