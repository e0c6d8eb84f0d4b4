"""Launch detection on every launcher the trainers support (plain, torchrun 1 and 2 nodes, Slurm srun, hfai),
preemption by SIGUSR1 and by hfai's suspend command, and elastic restarts: each run as a user's job would."""
import os
import signal
import subprocess
import sys
import time

import pytest

from engine import launch as L
from tests.compare import assert_states_match
from tests.conftest import REPO
from tests.test_train_gpt import run_gpt
from tests.test_train_vqgan import _env, _free_port, interrupt_at, load_state

# --- detection from each launcher's environment -----------------------------------------------------------


def test_plain_process():
    found = L.detect({}, hfai=False)
    assert (found.kind, found.rank, found.world_size, found.local_rank) == ("plain", 0, 1, 0)
    assert not found.distributed


def test_torchrun_variables_are_taken_as_they_are():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29400",
           "GROUP_RANK": "2", "GROUP_WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "x"}
    found = L.detect(env, hfai=False)
    assert (found.kind, found.rank, found.world_size, found.local_rank) == ("torchrun", 5, 8, 1)
    assert (found.master_addr, found.master_port, found.nodes, found.node_rank) == ("10.1.2.3", 29400, 4, 2)


def test_slurm_srun_task():
    env = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "6", "SLURM_LOCALID": "2", "SLURM_STEP_NUM_TASKS": "8",
           "SLURM_NTASKS": "16", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[01-08]",
           "SLURM_STEP_NUM_NODES": "2", "SLURM_NODEID": "1"}
    found = L.detect(env, hfai=False)
    assert (found.kind, found.rank, found.world_size, found.local_rank) == ("slurm", 6, 8, 2)
    assert found.master_addr == "gpu07"  # the step's first node, not the job's
    assert found.master_port == 15000 + 4242 % 20000 and (found.nodes, found.node_rank) == (2, 1)
    # Every task, and a requeued run of the job, agrees on the port; MASTER_PORT overrides it.
    assert L.detect({**env, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, hfai=False).master_port == found.master_port
    assert L.detect({**env, "MASTER_PORT": "23456"}, hfai=False).master_port == 23456


def test_slurm_batch_script_and_single_task_run_plain():
    batch = {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n[1-2]"}
    assert L.detect(batch, hfai=False).kind == "plain"  # the batch shell is no task: no SLURM_LOCALID
    single = {**batch, "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "1"}
    assert L.detect(single, hfai=False).kind == "plain"


def test_torchrun_inside_slurm_wins():
    env = {"SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "a[1-2]",
           "RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "a1", "MASTER_PORT": "1234"}
    found = L.detect(env, hfai=False)
    assert (found.kind, found.rank, found.world_size) == ("torchrun", 3, 8)


def test_hfai_node_process_and_its_spawned_children():
    env = {"MASTER_IP": "10.0.0.9", "MASTER_PORT": "2222", "WORLD_SIZE": "4", "RANK": "2",
           "CLIPGEN_PROCS_PER_NODE": "8"}
    node = L.detect(env, hfai=True)
    assert (node.kind, node.nodes, node.node_rank, node.procs_per_node, node.world_size) == ("hfai", 4, 2, 8, 32)
    child_env = dict(env)
    L.export_env(L.Launch("hfai", 2 * 8 + 3, 32, 3, "10.0.0.9", 2222, 4, 2), child_env)
    child_env[L.SPAWNED_FLAG] = "hfai"
    child = L.detect(child_env, hfai=True)
    assert (child.kind, child.rank, child.world_size, child.local_rank) == ("hfai", 19, 32, 3)
    assert (child_env["MASTER_ADDR"], child_env["MASTER_PORT"]) == ("10.0.0.9", "2222")
    # The same variables without the hfai package are not hfai's.
    assert L.detect(env, hfai=False).kind == "torchrun"


@pytest.mark.parametrize("nodelist,hosts", [
    ("node7", ["node7"]), ("a1,b2", ["a1", "b2"]), ("gpu[03-05,9],cpu1", ["gpu03", "gpu04", "gpu05", "gpu9", "cpu1"]),
    ("r[1-2]n[08-09]", ["r1n08", "r1n09", "r2n08", "r2n09"]),
])
def test_slurm_node_lists(nodelist, hosts):
    assert L.expand_nodelist(nodelist) == hosts and L.first_host(nodelist) == hosts[0]


def test_restarts_are_recognised():
    assert not L.is_restart({}) and not L.is_restart({"TORCHELASTIC_RESTART_COUNT": "0"})
    assert L.is_restart({"TORCHELASTIC_RESTART_COUNT": "2"}) and L.is_restart({"SLURM_RESTART_COUNT": "1"})


# --- the trainers under each launcher -------------------------------------------------------------------

EQUAL = ["--max-steps", "4", "--embed-noise", "0", "--cond-drop", "0.5", "--dropout", "0", "--val-every", "4",
         "--sample-every", "0", "--device", "cpu", "--precision", "fp32"]


def gpt_cmd(frozen, args):
    return [sys.executable, "train_gpt.py", "--vqgan", str(frozen / "vqgan.pt"), "--clip", str(frozen / "clip.pt"),
            "--batch-size", "8", "--no-tensorboard", "--log-every", "1", "--num-workers", "0",
            "--prompts", "a red circle", "--warmup-steps", "2", "--shards", str(frozen / "enc-unlabeled"), *args]


def assert_same_model(a_path, b_path):
    a, b = load_state(a_path), load_state(b_path)
    assert a["step"] == b["step"]
    # As in test_train_gpt: each tensor on its own (tests/compare.py), within 4 steps' summed learning rate.
    for part in ("model", "ema"):
        assert_states_match(a[part], b[part], part, bound=4 * 6e-4)


@pytest.fixture(scope="module")
def one_process(frozen, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    r = run_gpt(frozen, ["--shards", str(frozen / "enc-unlabeled"), *EQUAL, "--out-dir", str(out)])
    assert r.returncode == 0, r.stderr
    return out / "latest.pt"


def wait_all(procs, timeout=300):
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        outs.append((p.returncode, out, err))
    return outs


def test_slurm_srun_two_tasks_equal_one_process(frozen, one_process, tmp_path):
    """Two processes with only the variables `srun -n 2` gives its tasks (no RANK, no MASTER_ADDR)."""
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(_env(), SLURM_JOB_ID="77", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                   SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2", SLURM_STEP_NODELIST="127.0.0.1",
                   SLURM_NNODES="1", SLURM_NODEID="0", MASTER_PORT=port)
        procs.append(subprocess.Popen(gpt_cmd(frozen, [*EQUAL, "--out-dir", str(tmp_path)]), cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = wait_all(procs)
    for code, out, err in results:
        assert code == 0, err
    assert "2 process(es)" in results[0][1]  # the header, printed by rank 0
    assert_same_model(one_process, tmp_path / "latest.pt")


def test_torchrun_two_nodes_as_two_local_processes(frozen, one_process, tmp_path):
    """The 2-node command from the README, each 'node' a local torchrun with its own --node_rank."""
    port = str(_free_port())
    procs = []
    for node in range(2):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                    "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port]
        procs.append(subprocess.Popen(torchrun + gpt_cmd(frozen, [*EQUAL, "--out-dir", str(tmp_path)])[1:],
                                      cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = wait_all(procs)
    for code, out, err in results:
        assert code == 0, err
    assert "2 process(es)" in results[0][1]
    assert_same_model(one_process, tmp_path / "latest.pt")


FAKE_HFAI = '''"""A stand-in for High-Flyer's client (not on public registries): the suspend command is a file."""
import os


class client:
    @staticmethod
    def receive_suspend_command():
        return os.path.exists(os.environ["FAKE_HFAI_SUSPEND"])

    @staticmethod
    def go_suspend():
        with open(os.environ["FAKE_HFAI_SUSPENDED"], "a") as f:
            f.write(f"{os.getpid()}\\n")
'''


def hfai_env(tmp_path, procs_per_node=2):
    fake = tmp_path / "fake_hfai"
    (fake / "hfai").mkdir(parents=True, exist_ok=True)
    (fake / "hfai" / "__init__.py").write_text(FAKE_HFAI)
    return dict(_env(), PYTHONPATH=f"{fake}{os.pathsep}{REPO}", MASTER_IP="127.0.0.1", MASTER_PORT=str(_free_port()),
                WORLD_SIZE="1", RANK="0", CLIPGEN_PROCS_PER_NODE=str(procs_per_node),
                FAKE_HFAI_SUSPEND=str(tmp_path / "suspend"), FAKE_HFAI_SUSPENDED=str(tmp_path / "suspended"))


@pytest.mark.slow  # the default run keeps hfai's spawn through the suspend test below
def test_hfai_node_spawns_one_process_per_gpu(frozen, one_process, tmp_path):
    """`hfai python train_gpt.py -- -n 1` starts one process per node: it spawns the per-GPU ranks."""
    r = subprocess.run(gpt_cmd(frozen, [*EQUAL, "--out-dir", str(tmp_path / "run")]), cwd=REPO,
                       env=hfai_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "2 process(es)" in r.stdout
    assert_same_model(one_process, tmp_path / "run" / "latest.pt")
    assert not (tmp_path / "suspended").exists()  # nobody asked to suspend


def test_hfai_suspend_saves_suspends_and_resumes_at_the_next_step(frozen, tmp_path):
    env = hfai_env(tmp_path)
    (tmp_path / "suspend").touch()  # the cluster wants the node back from the start
    args = ["--max-steps", "10", "--val-every", "100", "--sample-every", "0", "--save-every", "100",
            "--out-dir", str(tmp_path / "run")]
    r = subprocess.run(gpt_cmd(frozen, args), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "received hfai's suspend command" in r.stdout
    stopped = load_state(tmp_path / "run" / "latest.pt")["step"]
    assert 1 <= stopped < 10
    assert len((tmp_path / "suspended").read_text().split()) == 1  # rank 0 told hfai, once
    (tmp_path / "suspend").unlink()
    r = subprocess.run(gpt_cmd(frozen, args + ["--resume", "auto"]), cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resuming at step {stopped}" in r.stdout
    steps = [int(line.split()[1].split("/")[0]) for line in r.stdout.splitlines() if line.startswith("step ")]
    assert steps[0] == stopped + 1 and steps[-1] == 10


def test_sigusr1_saves_and_a_relaunch_continues_at_the_next_step(frozen, tmp_path):
    """Slurm's preemption warning (--signal=USR1@T): save, exit 0; the requeued job goes on from there."""
    args = ["--max-steps", "15", "--val-every", "100", "--sample-every", "0", "--save-every", "100",
            "--out-dir", str(tmp_path)]
    rc, out, err = interrupt_at(gpt_cmd(frozen, args), "step 3/15", signal.SIGUSR1)
    assert rc == 0, err
    assert "received SIGUSR1" in out
    stopped = load_state(tmp_path / "latest.pt")["step"]
    assert 3 <= stopped < 15
    # A requeued Slurm job is the same command again; SLURM_RESTART_COUNT > 0 makes it resume without --resume.
    r = subprocess.run(gpt_cmd(frozen, args), cwd=REPO, env=dict(_env(), SLURM_RESTART_COUNT="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resuming at step {stopped}" in r.stdout
    steps = [int(line.split()[1].split("/")[0]) for line in r.stdout.splitlines() if line.startswith("step ")]
    assert steps[0] == stopped + 1 and steps[-1] == 15


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


@pytest.mark.slow  # ~1 min: a 2-process run long enough to kill a worker mid-way, then its restart
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc")
def test_elastic_restart_after_a_killed_worker_resumes_from_the_latest_checkpoint(frozen, tmp_path):
    """torchrun --max-restarts 1: a worker killed mid-run brings the group back at latest.pt."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}"]
    args = ["--max-steps", "400", "--val-every", "1000", "--sample-every", "0", "--save-every", "5",
            "--out-dir", str(tmp_path)]
    proc = subprocess.Popen(torchrun + gpt_cmd(frozen, args)[1:], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (tmp_path / "latest.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    time.sleep(0.5)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    resumed = [line for line in out.splitlines() if "resuming at step" in line]
    assert resumed, out[-2000:]
    at = int(resumed[0].split("resuming at step ")[1].split()[0])
    assert at >= 5 and at % 5 == 0
    assert load_state(tmp_path / "latest.pt")["step"] == 400
