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

# Tiny models on a 2-core machine: OpenMP hand-offs between threads cost more than they save, and `make test`
# runs two test processes (pytest-xdist), one a core.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts with one torch thread: code under test that sets more (demo.main on a big model)
    would otherwise leave them to the tests after it, which then fight the other test process for cores."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def frozen(tmp_path_factory):
    """A tiny VQGAN and a tiny CLIP checkpoint, and pre-encoded Shapes shards made with them (both splits):
    built once per test session, shared by every module that trains a GPT."""
    from tests import forkrun
    from tests.tiny import write_tiny

    root = write_tiny(tmp_path_factory.mktemp("stage2"), gpt=False)
    for split in ("unlabeled", "captioned"):
        r = forkrun.run("preencode.py", "--vqgan", root / "vqgan.pt", "--clip", root / "clip.pt", "--out",
                        root / f"enc-{split}", "--shapes-split", split, "--shapes-train-size", "96",
                        "--shapes-val-size", "16", "--shard-size", "40", "--num-workers", "0")
        assert r.returncode == 0, r.stderr
        assert "done: encoded 96 train and 16 val items" in r.stdout
    return root


@pytest.fixture(scope="session")
def forkrun():
    """run(script, *args, fault=None) -> (returncode, stdout, stderr), as `python script args` in the repo,
    forked from one server that imported torch and the project once (tests/forkrun.py): ~0.3 s a run
    instead of ~4 s."""
    from tests import forkrun as server

    return server.run


def assert_one_error(r, needle: str = "") -> str:
    """Non-zero exit, exactly one `error:` line on stderr (containing needle), no traceback."""
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode not in (0, None) and r.returncode > 0, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert len(errors) == 1, r.stderr
    assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="session")
def app_server():
    """`python app.py --port P` on the shipped models, as a user starts it: (gradio_client.Client, port)."""
    import socket
    import time

    import gradio_client

    from tests.test_train_vqgan import _env, _free_port

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited: {proc.stdout.read()}")
            time.sleep(0.2)
    client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
    yield client, port
    proc.terminate()
    proc.wait(timeout=30)
