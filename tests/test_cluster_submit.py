"""cluster.submit, without a Slurm cluster: the sbatch script it would submit (and that a fake sbatch gets
the same one), one-line user errors, the rank variables each task's trainer sees, checkpoint() stopping the
trainer and handing submitit the job back, a time-out requeue that resumes through submitit's local
executor, and a real train_vqgan.py run through `--executor local`."""
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import submitit
import torch
from submitit.core.utils import DelayedSubmission

from cluster import submit
from cluster.submit import TrainerJob
from tests.conftest import REPO

DRY = ["--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time", "1:00:00"]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SUBMITIT_EXECUTOR"):
        env.pop(k, None)
    return env


def _fake_slurm(bin_dir: Path, record: Path, fail: str = "") -> None:
    """sbatch/srun stand-ins: sbatch copies the script it is given to `record` (or fails with `fail`)."""
    bin_dir.mkdir(exist_ok=True)
    if fail:
        body = f'echo "{fail}" >&2\nexit 1\n'
    else:
        body = f'cp "$1" {record}\necho "Submitted batch job 4242"\n'
    (bin_dir / "sbatch").write_text("#!/bin/sh\nPATH=/usr/bin:/bin\n" + body)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for f in ("sbatch", "srun"):
        (bin_dir / f).chmod(0o755)


def test_dry_run_prints_the_sbatch_script_and_submits_nothing(tmp_path):
    _fake_slurm(tmp_path / "bin", tmp_path / "submitted.sh")
    r = subprocess.run([sys.executable, "-m", "cluster.submit", *DRY, "--log-dir", str(tmp_path / "logs/%j"),
                        "--dry-run", "--", "train_gpt.py", "--preset", "tiny", "--out-dir", "runs/g"],
                       cwd=REPO, env=_env(PATH=str(tmp_path / "bin")), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "#!/bin/bash"
    for expected in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                     "#SBATCH --partition=gpu", "#SBATCH --time=60", "#SBATCH --signal=USR2@120",
                     "#SBATCH --requeue", "#SBATCH --job-name=train_gpt"):
        assert expected in lines, expected
    srun = [l for l in lines if l.startswith("srun ")]
    assert len(srun) == 1 and "-m submitit.core._submit" in srun[0]
    assert any("train_gpt.py --preset tiny --out-dir runs/g --resume auto" in l for l in lines)
    assert not (tmp_path / "submitted.sh").exists() and not (tmp_path / "logs").exists()


def test_submission_sends_the_dry_run_script_and_a_resuming_job(tmp_path, monkeypatch, capsys):
    """With a stand-in sbatch: what is submitted is what --dry-run shows, and the pickled job resumes."""
    _fake_slurm(tmp_path / "bin", tmp_path / "submitted.sh")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.chdir(REPO)
    own = [*DRY, "--max-requeues", "5", "--log-dir", str(tmp_path / "logs/%j")]
    command = ["--", "train_vqgan.py", "--preset", "shapes"]
    assert submit.main(own + command) == 0
    out = capsys.readouterr().out
    assert "submitted job 4242" in out
    assert submit.main(own + ["--dry-run"] + command) == 0
    dry = capsys.readouterr().out
    assert (tmp_path / "submitted.sh").read_text().strip() == dry.strip()
    with open(tmp_path / "logs/4242/4242_submitted.pkl", "rb") as f:
        delayed = pickle.load(f)
    job = delayed.function
    assert isinstance(job, TrainerJob) and job.max_requeues == 5 and job.script == str(REPO / "train_vqgan.py")
    assert job.command_args() == ["--preset", "shapes", "--resume", "auto"]


@pytest.mark.parametrize("argv, says", [
    (["--nodes", "1", "--gpus-per-node", "1", "--partition", "p", "--time", "10", "train_gpt.py"], "after '--'"),
    (["--nodes", "1", "--gpus-per-node", "1", "--partition", "p", "--time", "10", "--"], "no training script"),
    (["--nodes", "1", "--gpus-per-node", "1", "--partition", "p", "--time", "10", "--", "missing.py"], "not found"),
    (["--nodes", "1", "--gpus-per-node", "1", "--partition", "p", "--time", "10", "--", "README.md"], "not a Python"),
    (["--nodes", "0", "--gpus-per-node", "1", "--partition", "p", "--time", "10", "--", "train_gpt.py"], "--nodes"),
    (["--nodes", "1", "--gpus-per-node", "1", "--partition", "p", "--time", "1h", "--", "train_gpt.py"], "--time"),
    (["--nodes", "1", "--gpus-per-node", "1", "--partition", "p", "--time", "1:70:00", "--", "train_gpt.py"],
     "--time"),
    (["--nodes", "1", "--gpus-per-node", "1", "--partition", "p", "--time", "0", "--", "train_gpt.py"], "--time"),
    (["--nodes", "1", "--gpus-per-node", "1", "--time", "10", "--", "train_gpt.py"], "--partition"),
    (["--nodes", "2", "--gpus-per-node", "1", "--time", "10", "--executor", "local", "--", "train_gpt.py"],
     "--nodes 1"),
    (["--nodes", "1", "--gpus-per-node", "1", "--partition", "p", "--time", "10", "--", "train_gpt.py"],
     "sbatch not found"),
])
def test_user_errors_end_in_one_line(argv, says, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here, whatever machine runs the tests
    monkeypatch.chdir(REPO)
    assert submit.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], captured.err
    assert captured.out == ""


def test_sbatch_refusal_is_one_line(tmp_path, monkeypatch, capsys):
    _fake_slurm(tmp_path / "bin", tmp_path / "x.sh", fail="sbatch: error: invalid partition specified: nope")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.chdir(REPO)
    assert submit.main([*DRY, "--log-dir", str(tmp_path / "logs"), "--", "train_gpt.py"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: sbatch refused the job: sbatch: error: invalid partition specified: nope"]


def test_time_formats():
    assert submit.parse_time("90") == 90
    assert submit.parse_time("1:00:00") == 60
    assert submit.parse_time("00:30:01") == 31
    assert submit.parse_time("2-04:00:00") == 2 * 1440 + 240


# ------------------------------------------------------------------------------- the job in each task

@pytest.fixture
def slurm_task(monkeypatch):
    """The variables Slurm gives task 5 of 8 (node 1 of node[01-02], local rank 1) of job 4242."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "_TEST_CLUSTER_",
              "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in dict(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_PROCID="5", SLURM_NTASKS="8",
                     SLURM_LOCALID="1", SLURM_NODEID="1", SLURM_JOB_NUM_NODES="2",
                     SLURM_JOB_NODELIST="node[01-02]", OMP_NUM_THREADS="1").items():
        monkeypatch.setenv(k, v)


ENV_SCRIPT = """import json, os, sys
keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")
json.dump({"env": {k: os.environ.get(k) for k in keys}, "argv": sys.argv[1:], "cwd": os.getcwd()},
          open(sys.argv[2], "w"))
sys.exit(int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[3] == "--status" else 0)
"""


def test_task_sets_rank_variables_and_resumes(slurm_task, tmp_path):
    (tmp_path / "show_env.py").write_text(ENV_SCRIPT)
    job = TrainerJob(str(tmp_path / "show_env.py"), ["--out", str(tmp_path / "seen.json")], str(tmp_path))
    before = signal.getsignal(signal.SIGTERM)
    assert job() == f"{tmp_path / 'show_env.py'} finished"
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["env"] == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node01",
                           "MASTER_PORT": str(15000 + 4242 % 20000), "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"}
    assert seen["argv"] == ["--out", str(tmp_path / "seen.json"), "--resume", "auto"]
    assert seen["cwd"] == str(tmp_path)
    assert signal.getsignal(signal.SIGTERM) is before  # the task's handler is put back


def test_resume_flag_kept_until_a_requeue_saved_latest():
    job = TrainerJob("t.py", ["--resume", "other/latest.pt", "--lr", "1"], ".")
    assert job.command_args() == ["--resume", "other/latest.pt", "--lr", "1"]
    job.resume_auto = True  # what checkpoint() sets once the trainer has saved its own latest.pt
    assert job.command_args() == ["--lr", "1", "--resume", "auto"]
    assert TrainerJob("t.py", ["--resume=x.pt"], ".").command_args() == ["--resume=x.pt"]


def test_trainer_failure_fails_the_task_in_one_line(slurm_task, tmp_path):
    (tmp_path / "show_env.py").write_text(ENV_SCRIPT)
    job = TrainerJob(str(tmp_path / "show_env.py"), ["--out", str(tmp_path / "e.json"), "--status", "3"],
                     str(tmp_path))
    with pytest.raises(RuntimeError, match=r"exited with status 3") as e:
        job()
    assert "\n" not in str(e.value)


SAVE_ON_USR1 = """import os, signal, sys, time
out = sys.argv[1]
def save(signum, frame):
    open(os.path.join(out, "saved"), "w").write(signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGUSR1, save)
open(os.path.join(out, "ready"), "w").close()
while True:
    time.sleep(0.05)
"""


def _start_saver(job, tmp_path):
    job.launch()
    deadline = time.monotonic() + 30
    while not (tmp_path / "ready").exists():
        assert job.poll() is None and time.monotonic() < deadline, "the child did not start"
        time.sleep(0.05)


def test_checkpoint_stops_the_trainer_then_requeues_itself(slurm_task, tmp_path):
    (tmp_path / "saver.py").write_text(SAVE_ON_USR1)
    job = TrainerJob(str(tmp_path / "saver.py"), [str(tmp_path)], str(tmp_path), signal_delay_s=20, max_requeues=2)
    _start_saver(job, tmp_path)
    # submitit's own signal (USR2) reaches every process of a Slurm step: the trainer must not die of it
    os.kill(job._proc.pid, submitit.JobEnvironment._usr_sig())
    time.sleep(0.5)
    assert job.poll() is None
    delayed = job.checkpoint()
    assert (tmp_path / "saved").read_text() == "SIGUSR1"
    assert job.poll() == 0
    assert isinstance(delayed, DelayedSubmission) and delayed.function is job
    assert job.requeues == 1 and job.resume_auto
    # what submitit pickles for the next run: no process, the count, and resume from latest.pt
    again = pickle.loads(pickle.dumps(delayed)).function
    assert again._proc is None and again.requeues == 1 and again.command_args()[-2:] == ["--resume", "auto"]


def _sigterm_when_ready(tmp_path):
    def send():
        deadline = time.monotonic() + 30
        while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # as Slurm does on preemption; handled by the running job
    threading.Thread(target=send, daemon=True).start()


@pytest.mark.parametrize("rank", ["0", "5"])
def test_sigterm_in_the_task_stops_the_trainer(rank, slurm_task, tmp_path, monkeypatch):
    """Preemption's SIGTERM reaches the trainer as SIGUSR1 even where Slurm does not signal it directly;
    rank 0 then reports the run as unfinished (unless submitit requeues it meanwhile), other ranks end."""
    monkeypatch.setenv("SLURM_PROCID", rank)
    (tmp_path / "saver.py").write_text(SAVE_ON_USR1)
    job = TrainerJob(str(tmp_path / "saver.py"), [str(tmp_path)], str(tmp_path), signal_delay_s=1)
    _sigterm_when_ready(tmp_path)
    if rank == "0":
        with pytest.raises(RuntimeError, match="stopped on SIGTERM and the job was not requeued"):
            job()
        assert job.resume_auto
    else:
        assert job().endswith("finished")
    assert (tmp_path / "saved").read_text() == "SIGUSR1"


def test_checkpoint_stops_but_does_not_requeue_past_max_requeues(slurm_task, tmp_path):
    (tmp_path / "saver.py").write_text(SAVE_ON_USR1)
    job = TrainerJob(str(tmp_path / "saver.py"), [str(tmp_path)], str(tmp_path), signal_delay_s=20, max_requeues=0)
    _start_saver(job, tmp_path)
    assert job.checkpoint() is None
    assert (tmp_path / "saved").exists() and job.poll() == 0


# ------------------------------------------------------------------- whole jobs, through submitit's local executor

FAKE_TRAINER = """import json, os, signal, sys, time
out, steps = sys.argv[1], int(sys.argv[2])
resume = sys.argv[sys.argv.index("--resume") + 1] if "--resume" in sys.argv else None
latest = os.path.join(out, "latest.json")
start = json.load(open(latest))["step"] if resume == "auto" and os.path.exists(latest) else 0
with open(os.path.join(out, "runs.txt"), "a") as f:
    f.write(f"{start}\\n")
stop = []
signal.signal(signal.SIGUSR1, lambda s, f: stop.append(s))
for step in range(start + 1, steps + 1):
    time.sleep(0.25)
    if stop or step == steps:
        json.dump({"step": step}, open(latest + ".tmp", "w"))
        os.replace(latest + ".tmp", latest)
        if stop:
            sys.exit(0)
"""


def test_time_out_requeues_and_resumes_with_the_local_executor(tmp_path, monkeypatch):
    """submitit's own machinery end to end: its time-out signal, checkpoint(), the pickled job, the
    requeue, and a relaunched trainer that continues from the step the first one saved."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (tmp_path / "fake_trainer.py").write_text(FAKE_TRAINER)
    monkeypatch.chdir(tmp_path)
    args = submit.parse_args(["--nodes", "1", "--gpus-per-node", "1", "--time", "1", "--signal-delay", "22",
                              "--executor", "local", "--max-requeues", "3", "--log-dir", str(tmp_path / "logs/%j"),
                              "--", "fake_trainer.py", str(tmp_path), "40"])
    args.minutes = 0.5  # a 30 s limit: the time-out signal comes 8 s in, before the 10 s of "training" end
    job = submit.make_job(args)
    running = submit.make_executor(args, job).submit(job)
    try:
        assert running.result() == f"{tmp_path / 'fake_trainer.py'} finished"
    finally:
        running.cancel()
    starts = [int(l) for l in (tmp_path / "runs.txt").read_text().split()]
    assert len(starts) >= 2 and starts[0] == 0 and all(s > 0 for s in starts[1:]), starts
    assert starts == sorted(starts)
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 40
    log = (Path(running.paths.stdout)).read_text()
    assert "requeue 1)" in log and "--resume auto" in log


def test_local_executor_trains_vqgan_in_two_processes_and_saves(tmp_path):
    """`--executor local` end to end: two tasks whose rank variables form one gloo group, a real
    trainer, latest.pt at the last step, and --wait reporting rank 0's result."""
    out = tmp_path / "vqgan"
    r = subprocess.run(
        [sys.executable, "-m", "cluster.submit", "--nodes", "1", "--gpus-per-node", "2", "--time", "10",
         "--executor", "local", "--wait", "--log-dir", str(tmp_path / "logs/%j"), "--",
         "train_vqgan.py", "--preset", "shapes", "--batch-size", "8", "--no-tensorboard", "--shapes-val-size", "16",
         "--val-batches", "1", "--shapes-train-size", "16", "--max-steps", "2", "--val-every", "100",
         "--num-workers", "0", "--device", "cpu", "--out-dir", str(out)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1] == f"{REPO / 'train_vqgan.py'} finished"
    logs = r.stdout.split("logs: ")[1].splitlines()[0]
    task_logs = [Path(logs, f"{Path(logs).name}_{t}_log.out").read_text() for t in (0, 1)]
    assert "rank 0/2" in task_logs[0] and "rank 1/2" in task_logs[1]
    assert "2 process(es)" in task_logs[0] and "done: step 2" in task_logs[0]
    state = torch.load(out / "latest.pt", map_location="cpu", weights_only=True)
    assert state["kind"] == "vqgan" and state["step"] == 2
