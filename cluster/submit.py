"""Submit a trainer to Slurm through submitit, so that it requeues itself and resumes when its time runs out.

    python -m cluster.submit --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
        -- train_gpt.py --vqgan V.pt --clip C.pt --shards runs/encoded --out-dir runs/gpt

How a job runs: Slurm starts one task per GPU (nodes x gpus-per-node tasks). Each task is submitit's
runner, which unpickles a `TrainerJob` and calls it; the job sets the torchrun-style variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR = the first node, MASTER_PORT = derived from the job id) and runs
`python SCRIPT ARGS --resume auto` as a child process, whose exit status becomes the task's.

Time-out and preemption: Slurm sends submitit's signal (USR2) `--signal-delay` seconds before the end.
submitit then calls `TrainerJob.checkpoint()` in rank 0's task: it sends SIGUSR1 to the trainer, which
finishes its step, writes latest.pt and exits 0 (every rank stops at the same step: engine/signals.py and
engine/distributed.any_rank); then it returns a DelayedSubmission of itself, submitit pickles it and runs
`scontrol requeue`. The requeued job (same job id, so the same port) starts the trainer again with
`--resume auto`, which continues from latest.pt. After `--max-requeues` requeues the job just ends.

User errors end in one `error: ...` line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import submitit
from submitit.core.utils import DelayedSubmission, FailedJobError, FailedSubmissionError
from submitit.slurm.slurm import _make_sbatch_string  # the sbatch text SlurmExecutor itself submits

REPO = Path(__file__).resolve().parents[1]
TRAINERS = ("train_gpt.py", "train_vqgan.py", "train_clip.py")
SIGNAL_DELAY_S = 120  # a step plus writing latest.pt must fit in it (a big GPT's checkpoint takes tens of s)
MAX_REQUEUES = 20
POLL_S = 0.2


class UsageError(Exception):
    """A mistake the user can fix: printed as one `error: ...` line, exit status 2."""


# ----------------------------------------------------------------------------------------- the job itself

def master_port(job_id: str) -> int:
    """engine/launch.py's port rule for a Slurm job, so both ways of starting a job agree."""
    from engine.launch import job_port

    return job_port(job_id)


def has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def replace_flag(args: list[str], flag: str, value: str) -> list[str]:
    """args with every `flag X` / `flag=X` dropped and `flag value` appended."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out + [flag, value]


class TrainerJob(submitit.helpers.Checkpointable):
    """What each Slurm task runs: the trainer as a child process, with the rank variables set.

    A child process rather than an import: the trainer keeps its own signal handlers and CUDA state, the
    task process stays free to receive submitit's signal while the child trains, and a crash of the
    trainer is an exit status, not a half-torn-down interpreter."""

    def __init__(self, script: str, args: list[str], workdir: str, signal_delay_s: int = SIGNAL_DELAY_S,
                 max_requeues: int = MAX_REQUEUES):
        self.script = str(script)
        self.args = list(args)
        self.workdir = str(workdir)
        self.signal_delay_s = signal_delay_s
        self.max_requeues = max_requeues
        self.requeues = 0  # travels with the pickle submitit writes at each requeue
        self.resume_auto = False  # set once the trainer has saved latest.pt on our request
        self._proc: subprocess.Popen | None = None
        self._stopped_by = ""

    # -- what the child gets
    def command_args(self) -> list[str]:
        """The trainer's arguments, made to resume: `--resume auto` unless the user gave --resume; after a
        requeue whose trainer saved latest.pt, a user's `--resume PATH` (say, to start from another run)
        becomes `auto` too, so the requeued run continues from its own latest.pt, not from PATH again."""
        if not has_flag(self.args, "--resume") or self.resume_auto:
            return replace_flag(self.args, "--resume", "auto")
        return list(self.args)

    def rank_env(self, job_env) -> dict[str, str]:
        """torchrun's variables for this task, from submitit's JobEnvironment (SLURM_* under Slurm)."""
        nodes, tasks = job_env.num_nodes, job_env.num_tasks
        master = "127.0.0.1" if nodes == 1 else job_env.hostnames[0]
        port = os.environ.get("MASTER_PORT") or str(master_port(job_env.raw_job_id))
        return {"RANK": str(job_env.global_rank), "WORLD_SIZE": str(tasks),
                "LOCAL_RANK": str(job_env.local_rank), "LOCAL_WORLD_SIZE": str(max(1, tasks // nodes)),
                "GROUP_RANK": str(job_env.node), "GROUP_WORLD_SIZE": str(nodes),
                "MASTER_ADDR": master, "MASTER_PORT": str(port)}

    def launch(self, job_env=None) -> subprocess.Popen:
        """Start the trainer (not waiting for it)."""
        job_env = submitit.JobEnvironment() if job_env is None else job_env
        env = dict(os.environ, **self.rank_env(job_env), PYTHONUNBUFFERED="1")
        cmd = [sys.executable, self.script, *self.command_args()]
        print(f"[cluster.submit] rank {env['RANK']}/{env['WORLD_SIZE']} on {job_env.hostname}: "
              f"{shlex.join(cmd)} (master {env['MASTER_ADDR']}:{env['MASTER_PORT']}, requeue {self.requeues})",
              flush=True)
        # Under Slurm the trainer may receive submitit's own signal (USR2) too: it goes to every process of
        # the step. Its default action would kill the trainer unsaved, so the child ignores it; the stop
        # request reaches it as SIGUSR1 from checkpoint() (or as Slurm's SIGTERM on preemption).
        usr_sig = submitit.JobEnvironment._usr_sig()
        ignore = usr_sig not in (signal.SIGUSR1, signal.SIGTERM)
        ignore_usr_sig = (lambda: signal.signal(usr_sig, signal.SIG_IGN)) if ignore else None
        self._proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, preexec_fn=ignore_usr_sig)
        return self._proc

    # -- the child's state, read with os.waitpid: Popen.wait() holds a lock while it blocks, and a signal
    # handler (checkpoint) that waits on the same Popen from inside it would never get that lock.
    def poll(self) -> int | None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return None if proc is None else proc.returncode
        try:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
        except ChildProcessError:  # reaped by the frame this signal handler interrupted, which records the
            return proc.returncode if proc.returncode is not None else 0  # status: here only "it ended" counts
        if pid == 0:
            return None
        proc.returncode = os.waitstatus_to_exitcode(status)
        return proc.returncode

    def stop_child(self, timeout: float) -> bool:
        """SIGUSR1 to the trainer, and wait up to `timeout` s for it to save and exit. True if it exited 0
        (a trainer exits 0 only after writing latest.pt); a trainer still running then is killed."""
        if self.poll() is None:
            try:
                os.kill(self._proc.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while self.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.poll() is None:
                print(f"[cluster.submit] {self.script} did not save and exit within {timeout:.0f} s of SIGUSR1: "
                      "killed; the next run resumes from the previous latest.pt", flush=True)
                self._proc.kill()
                while self.poll() is None:
                    time.sleep(0.05)
        return self.poll() == 0

    # -- submitit's two entry points
    def __call__(self) -> str:
        job_env = submitit.JobEnvironment()
        self._stopped_by = ""
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)  # submitit only logs SIGTERM
        try:
            self.launch(job_env)
            while (rc := self.poll()) is None:
                time.sleep(POLL_S)
        finally:
            signal.signal(signal.SIGTERM, previous)
            if self._proc is not None and self.poll() is None:  # interrupted (cancelled, or a bug here)
                self.stop_child(min(30.0, 0.8 * self.signal_delay_s))
        if rc != 0:
            raise RuntimeError(f"{self.script} exited with status {rc} (its error is above in this task's log)")
        if self._stopped_by and job_env.global_rank == 0:
            # Preempted: SIGTERM stopped the trainer (it saved latest.pt). Slurm usually also sends
            # submitit's signal, whose handler requeues from inside this sleep; if none comes the job ends
            # unfinished, and the same command resubmitted continues it.
            self.resume_auto = True
            deadline = time.monotonic() + self.signal_delay_s
            while time.monotonic() < deadline:
                time.sleep(POLL_S)
            raise RuntimeError(f"{self.script} stopped on {self._stopped_by} and the job was not requeued; "
                               "latest.pt is saved: submit the same command again to continue")
        return f"{self.script} finished"

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission | None:
        """Called by submitit in rank 0's task on time-out or preemption: stop the trainer so that it saves,
        then hand submitit this job again (None: do not requeue)."""
        rc = self.poll()
        if rc not in (None, 0):
            print(f"[cluster.submit] not requeued: {self.script} had already failed (status {rc})", flush=True)
            return None
        if self._proc is not None and self.stop_child(0.8 * self.signal_delay_s):
            self.resume_auto = True
        if self.requeues >= self.max_requeues:
            print(f"[cluster.submit] not requeued: --max-requeues {self.max_requeues} reached; "
                  "latest.pt is saved, submit again to continue", flush=True)
            return None
        self.requeues += 1
        return DelayedSubmission(self)

    def _on_sigterm(self, signum, frame) -> None:
        self._stopped_by = signal.Signals(signum).name
        if self._proc is not None and self.poll() is None:
            try:
                os.kill(self._proc.pid, signal.SIGUSR1)  # where Slurm's SIGTERM does not reach the child
            except ProcessLookupError:
                pass

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_proc"], state["_stopped_by"] = None, ""  # a process does not travel to the next run
        return state


# ----------------------------------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(message)


def parse_time(text: str) -> int:
    """Slurm's --time as whole minutes: `90`, `HH:MM:SS`, `D-HH:MM:SS` (seconds round up)."""
    t = text.strip()
    if t.isdigit():
        minutes = int(t)
    else:
        m = re.fullmatch(r"(?:(\d+)-)?(\d+):([0-5]?\d):([0-5]?\d)", t)
        if not m:
            raise UsageError(f"--time {text!r} is not minutes, HH:MM:SS or D-HH:MM:SS (e.g. 90, 4:00:00, 1-12:00:00)")
        d, h, mi, s = (int(x or 0) for x in m.groups())
        minutes = d * 1440 + h * 60 + mi + math.ceil(s / 60)
    if minutes <= 0:
        raise UsageError(f"--time {text!r} is zero: give the job at least a minute")
    return minutes


def _positive(name):
    def convert(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
        return value
    return convert


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m cluster.submit",
                usage="python -m cluster.submit --nodes N --gpus-per-node G --partition P --time T [options] "
                      "-- SCRIPT.py ARGS...",
                description="Submit a trainer to Slurm (submitit), one task per GPU, requeued and resumed "
                            "from latest.pt when its time runs out or it is preempted.")
    p.add_argument("--nodes", type=_positive("--nodes"), required=True)
    p.add_argument("--gpus-per-node", type=_positive("--gpus-per-node"), required=True,
                   help="GPUs per node; one task (process) per GPU")
    p.add_argument("--partition", help="Slurm partition (required for --executor slurm)")
    p.add_argument("--time", required=True, help="time limit of each run: minutes, HH:MM:SS or D-HH:MM:SS")
    p.add_argument("--cpus-per-task", type=_positive("--cpus-per-task"), help="CPUs per GPU task (data workers + 1)")
    p.add_argument("--mem", help="memory per node, as sbatch takes it (e.g. 200G)")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--job-name", help="default: the script's name")
    p.add_argument("--log-dir", default="runs/submitit/%j",
                   help="submitit's folder: sbatch script, pickles, task logs; %%j = job id (default %(default)s)")
    p.add_argument("--max-requeues", type=int, default=MAX_REQUEUES,
                   help="requeues after time-out or preemption before the job just ends (default %(default)s)")
    p.add_argument("--signal-delay", type=_positive("--signal-delay"), default=SIGNAL_DELAY_S,
                   help="seconds before the time limit at which the trainer is told to save (default %(default)s)")
    p.add_argument("--executor", choices=("slurm", "local"), default="slurm",
                   help="local: submitit's LocalExecutor, the same job on this machine (one node)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end; exit 1 if it failed")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and exit; submits nothing")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    if "--" not in argv:
        if any(a in ("-h", "--help") for a in argv):
            build_parser().parse_args(argv)  # prints help, exits 0
        raise UsageError("put the training command after '--', e.g. python -m cluster.submit --nodes 1 "
                         "--gpus-per-node 8 --partition gpu --time 4:00:00 -- train_gpt.py ARGS")
    cut = argv.index("--")
    args = build_parser().parse_args(argv[:cut])
    command = argv[cut + 1:]
    if not command:
        raise UsageError("no training script after '--' (e.g. -- train_gpt.py ARGS)")
    script = Path(command[0])
    if script.suffix != ".py":
        raise UsageError(f"{command[0]} is not a Python script: give a trainer ({', '.join(TRAINERS)}) or a .py file "
                         "after '--' (no 'python' in front)")
    if not script.is_file():
        hint = f" (the trainers are in {REPO})" if script.name in TRAINERS else ""
        raise UsageError(f"{command[0]} not found from {Path.cwd()}{hint}")
    args.script, args.script_args = str(script.resolve()), command[1:]
    args.minutes = parse_time(args.time)
    if args.signal_delay >= args.minutes * 60:
        raise UsageError(f"--time {args.time} leaves no room for --signal-delay {args.signal_delay} s: "
                         "ask for more time or a shorter delay")
    if args.max_requeues < 0:
        raise UsageError("--max-requeues must be 0 or more")
    if args.executor == "slurm" and not args.partition:
        raise UsageError("--partition is required for Slurm (sinfo lists them)")
    if args.executor == "local" and args.nodes != 1:
        raise UsageError(f"--executor local runs on this one machine: use --nodes 1, not {args.nodes}")
    return args


def make_job(args) -> TrainerJob:
    return TrainerJob(args.script, args.script_args, os.getcwd(), args.signal_delay, args.max_requeues)


def slurm_parameters(args, job: TrainerJob) -> dict:
    """submitit's sbatch parameters (its own names): one task per GPU, requeue allowed."""
    setup = [f"# each task runs: {shlex.join([Path(sys.executable).name, job.script, *job.command_args()])}",
             f"cd {shlex.quote(job.workdir)}",
             f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}"]  # to unpickle cluster.submit
    if args.cpus_per_task:  # srun no longer inherits sbatch's --cpus-per-task (Slurm 22.05+)
        setup.append(f"export SRUN_CPUS_PER_TASK={args.cpus_per_task}")
    params = dict(job_name=args.job_name or Path(args.script).stem, partition=args.partition, time=args.minutes,
                  nodes=args.nodes, ntasks_per_node=args.gpus_per_node, gpus_per_node=args.gpus_per_node,
                  cpus_per_task=args.cpus_per_task, mem=args.mem, account=args.account, qos=args.qos,
                  constraint=args.constraint, signal_delay_s=args.signal_delay, setup=setup,
                  additional_parameters={"requeue": True})
    return {k: v for k, v in params.items() if v is not None}


def submit_command(folder: str) -> str:
    """What srun runs in each task: the same string SlurmExecutor._submitit_command_str builds."""
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit",
                     shlex.quote(str(Path(folder).expanduser().absolute()))])


def make_executor(args, job: TrainerJob):
    if args.executor == "local":
        executor = submitit.LocalExecutor(folder=args.log_dir, max_num_timeout=args.max_requeues)
        executor.update_parameters(timeout_min=args.minutes, nodes=1, tasks_per_node=args.gpus_per_node,
                                   gpus_per_node=args.gpus_per_node, signal_delay_s=args.signal_delay)
        return executor
    for tool in ("sbatch", "srun"):
        if shutil.which(tool) is None:
            raise UsageError(f"{tool} not found: submit from a Slurm login node (or try --dry-run, "
                             "or --executor local on this machine)")
    executor = submitit.SlurmExecutor(folder=args.log_dir, max_num_timeout=args.max_requeues)
    executor.update_parameters(**slurm_parameters(args, job))
    return executor


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        job = make_job(args)
        if args.dry_run:
            if args.executor == "local":
                print(f"# --executor local: {args.gpus_per_node} task(s) on this machine, each running\n"
                      f"{shlex.join([sys.executable, job.script, *job.command_args()])}")
            else:
                print(_make_sbatch_string(command=submit_command(args.log_dir), folder=args.log_dir,
                                          **slurm_parameters(args, job)))
            return 0
        if args.executor == "local":  # the task processes import cluster.submit to unpickle the job
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        executor = make_executor(args, job)
        said = io.StringIO()  # submitit prints sbatch's complaint on stderr itself: keep it to one line
        try:
            with contextlib.redirect_stderr(said):
                submitted = executor.submit(job)
        except (FailedJobError, FailedSubmissionError) as e:
            lines = [l for l in (str(e) + "\n" + said.getvalue()).splitlines() if l.strip()]
            raise UsageError(f"sbatch refused the job: {lines[0].strip() if lines else type(e).__name__}") from None
        sys.stderr.write(said.getvalue())
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    where = "locally" if args.executor == "local" else f"to Slurm ({args.nodes} node(s) x {args.gpus_per_node} GPU(s))"
    print(f"submitted job {submitted.job_id} {where}: {Path(args.script).name}")
    print(f"logs: {submitted.paths.folder}")
    if not args.wait:
        return 0
    try:
        print(submitted.results()[0])  # one result per task; rank 0's speaks for the job
    except Exception as e:  # submitit's FailedJobError carries the task's traceback: its last line says why
        lines = [l for l in str(e).strip().splitlines() if l.strip()]
        print(f"error: job {submitted.job_id} failed: {lines[-1] if lines else e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run as cluster.submit, not __main__, so the pickled TrainerJob names an importable class. Started as
    # `python cluster/submit.py`, Python puts cluster/ on the path, not the repository: put it there.
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from cluster import submit

    sys.exit(submit.main())
