"""Run the project's scripts as `python SCRIPT ARGS` runs them, many times, importing torch once.

A fresh `python train_vqgan.py ...` spends ~4 s of CPU importing torch, torchvision and the project before
it reads its first flag; tests/test_hostile.py runs dozens of them. This server (started once, with
sys.executable) imports all of that, then for each request forks a child that runs the script as
`__main__` with its argv, its folder first on sys.path, stdout and stderr in files, and exits as the
interpreter would: SystemExit's code, 1 and a printed traceback for an uncaught exception, killed by a
signal for a crash. Requests and replies are JSON lines on stdin / stdout.

    request: {"script": "train_vqgan.py", "args": [...], "stdout": PATH, "stderr": PATH, "fault": null}
    reply:   {"returncode": int}     (negative: killed by that signal)

fault "disk-full": every temporary file engine.checkpoint.atomic_write writes is /dev/full, which
refuses every write with ENOSPC, as a full disk does.

The test side is `shared()`: one server per test process, started on first use, whose `run(script, *args)`
returns what subprocess.run(..., capture_output=True, text=True) would (returncode, stdout, stderr). Short
training runs go through it too (their few steps cost less than the imports); runs that must be real
processes (signals sent mid-run, torchrun, launcher environments) stay subprocesses.
"""
from __future__ import annotations

import json
import os
import runpy
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
import types
from pathlib import Path

PRELOAD = ("torch", "torchvision", "PIL.Image", "safetensors.torch", "open_clip", "datasets", "engine.cli",
           "engine.trainer", "models.clip", "models.convert", "models.convert_gpt", "models.gpt", "models.losses",
           "models.vqgan", "evaluation.scenes_eval", "evaluation.zero_shot")


def on_dev_full(real_mkstemp):
    """A tempfile.mkstemp whose files are links to /dev/full: every write to them fails with ENOSPC."""
    def mkstemp(*args, **kwargs):
        fd, path = real_mkstemp(*args, **kwargs)
        os.close(fd)
        os.unlink(path)
        os.symlink("/dev/full", path)
        return os.open(path, os.O_WRONLY), path

    return mkstemp


def disk_full() -> None:
    """atomic_write's temporary files become links to /dev/full: its writes fail with ENOSPC."""
    import engine.checkpoint as ckpt

    class Tempfile:
        mkstemp = staticmethod(on_dev_full(ckpt.tempfile.mkstemp))

    ckpt.tempfile = Tempfile


FAULTS = {"disk-full": disk_full}


def child(request: dict) -> int:
    """In the forked child: run the script; returns the exit status the interpreter would give."""
    for fd, key in ((1, "stdout"), (2, "stderr")):
        target = os.open(request[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    script = request["script"]
    sys.argv = [script, *request["args"]]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # what `python SCRIPT` puts first
    try:
        if request.get("fault"):
            FAULTS[request["fault"]]()
        runpy.run_path(script, run_name="__main__")
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1


def serve() -> None:
    import importlib

    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, not tests/
    for name in PRELOAD:
        importlib.import_module(name)
    import torch

    torch.set_num_threads(1)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = child(request)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


class Client:
    """The test side: starts the server (in its own process group, with env) and sends it runs."""

    def __init__(self, env: dict):
        repo = Path(__file__).resolve().parents[1]
        self.logs = Path(tempfile.mkdtemp(prefix="forkrun-"))
        self.count = 0
        self.proc = subprocess.Popen([sys.executable, str(repo / "tests" / "forkrun.py")], cwd=repo, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
        assert json.loads(self._reply(300)) == {"ready": True}

    def _reply(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:  # a hung run: kill the server and its child, so the next test gets a fresh one
            self.kill()
            raise subprocess.TimeoutExpired("forkrun", timeout)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the forkrun server died")
        return line

    def run(self, script: str, *args, fault: str | None = None, timeout: float = 300):
        self.count += 1
        out, err = self.logs / f"{self.count}.out", self.logs / f"{self.count}.err"
        self.proc.stdin.write(json.dumps({"script": script, "args": [str(a) for a in args], "stdout": str(out),
                                          "stderr": str(err), "fault": fault}) + "\n")
        self.proc.stdin.flush()
        code = json.loads(self._reply(timeout))["returncode"]
        return types.SimpleNamespace(returncode=code, stdout=out.read_text(), stderr=err.read_text())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """Stop the server and any run of it still going; its logs go too."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        shutil.rmtree(self.logs, ignore_errors=True)


_shared: Client | None = None


def shared() -> Client:
    """This test process's server (started on first use, with the tests' subprocess environment)."""
    global _shared
    if _shared is None or not _shared.alive():
        import atexit

        from tests.test_train_vqgan import _env

        _shared = Client(_env())
        atexit.register(_shared.kill)
    return _shared


def run(script: str, *args, fault: str | None = None, timeout: float = 300):
    """`python script args` in the repository through this process's server: (returncode, stdout, stderr)."""
    return shared().run(script, *args, fault=fault, timeout=timeout)


if __name__ == "__main__":
    serve()
