"""Shared test set-up: fast single-threaded torch, and where the checkpoint fixtures live."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


# The CLIP-GEN / taming checkpoint fixtures are data inside the project, so a fresh clone runs every
# compatibility test; COMPAT_FIXTURES may point elsewhere. Never None: a missing fixture fails, not skips.
COMPAT_DIR = Path(os.environ.get("COMPAT_FIXTURES") or REPO / "tests" / "fixtures" / "compat")

# Tiny models on a 2-core machine: OpenMP hand-offs between threads cost more than they save.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def frozen(tmp_path_factory):
    """A tiny VQGAN and a tiny CLIP checkpoint, and pre-encoded Shapes shards made with them (both splits):
    built once per test session, shared by every module that trains a GPT."""
    from tests.test_train_vqgan import _env
    from tests.tiny import write_tiny

    root = write_tiny(tmp_path_factory.mktemp("stage2"), gpt=False)
    for split in ("unlabeled", "captioned"):
        r = subprocess.run([sys.executable, "preencode.py", "--vqgan", str(root / "vqgan.pt"), "--clip",
                            str(root / "clip.pt"), "--out", str(root / f"enc-{split}"), "--shapes-split", split,
                            "--shapes-train-size", "96", "--shapes-val-size", "16", "--shard-size", "40",
                            "--num-workers", "0"], cwd=REPO, env=_env(), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        assert "done: encoded 96 train and 16 val items" in r.stdout
    return root
