"""Shared test set-up: fast single-threaded torch, and where the checkpoint fixtures live."""
import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _compat_dir() -> Path | None:
    """The fixtures sit in ../shared/fixtures/compat beside the checkout (COMPAT_FIXTURES overrides)."""
    for p in (os.environ.get("COMPAT_FIXTURES"), REPO.parent / "shared" / "fixtures" / "compat"):
        if p and (Path(p) / "full_size_key_manifests.json").is_file():
            return Path(p)
    if os.environ.get("CI"):
        # In CI a missing fixture folder is a set-up error, not a reason to skip the importer tests.
        raise RuntimeError("compat fixtures not found in ../shared/fixtures/compat (or $COMPAT_FIXTURES)")
    return None


COMPAT_DIR = _compat_dir()

# Tiny models on a 2-core machine: OpenMP hand-offs between threads cost more than they save.
torch.set_num_threads(1)
