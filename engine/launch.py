"""Which launcher started this process, and what rank it is: the one place that reads launcher variables.

The rules, first match wins (README "Training on a cluster" repeats them):

1. hfai (High-Flyer): the `hfai` package is importable and `MASTER_IP` is set (hfai's name; torchrun and
   Slurm say MASTER_ADDR) and this is not already a process the runtime spawned. hfai starts ONE process per
   node with RANK = node rank and WORLD_SIZE = number of nodes; the runtime then spawns one process per GPU
   (`spawn_per_gpu`), each with rank = node_rank * gpus + local_rank. Its suspend command is polled by
   rank 0 and takes the same save-and-exit path as SIGTERM/SIGUSR1 (engine/signals.py), followed by
   `hfai.client.go_suspend()`.
2. torchrun, or anything that sets RANK and WORLD_SIZE (LOCAL_RANK, MASTER_ADDR, MASTER_PORT beside them):
   taken as they are. `torchrun` single- and multi-node, `python -m torch.distributed.run`, and processes
   cluster.submit starts all land here.
3. Slurm `srun` without torchrun: a job step's task (SLURM_PROCID and SLURM_LOCALID are set, and
   SLURM_STEP_NUM_TASKS, else SLURM_NTASKS, > 1). rank = SLURM_PROCID, world = the step's task count,
   local rank = SLURM_LOCALID, master = the first host of SLURM_STEP_NODELIST (else SLURM_JOB_NODELIST),
   port = MASTER_PORT if set, else 15000 + SLURM_JOB_ID % 20000 (every task of the job, and of its
   requeued runs, computes the same one). The batch script itself is not a task (no SLURM_LOCALID), so
   `python train_gpt.py` in an sbatch script without srun runs as one plain process.
4. Otherwise: one plain process (rank 0 of 1).

`export_env` writes the result back as RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT so that
torch.distributed's env:// rendezvous (and any library that reads them) agrees with it.
"""
from __future__ import annotations

import importlib.util
import os
import re
import zlib
from dataclasses import dataclass
from typing import Mapping

SPAWNED_FLAG = "CLIPGEN_SPAWNED"  # set in processes spawn_per_gpu starts (rule 1 then reads rule 2's vars)
PROCS_PER_NODE = "CLIPGEN_PROCS_PER_NODE"  # overrides the GPU count hfai's per-node spawn uses


@dataclass(frozen=True)
class Launch:
    kind: str  # "plain", "torchrun", "slurm", "hfai"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    nodes: int = 1
    node_rank: int = 0
    procs_per_node: int = 1  # hfai: processes to spawn on this node (the others: what the launcher made)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        where = f" via {self.master_addr}:{self.master_port}" if self.distributed and self.master_addr else ""
        return f"{self.kind}: rank {self.rank} of {self.world_size} (local rank {self.local_rank}){where}"


def hfai_available() -> bool:
    return importlib.util.find_spec("hfai") is not None


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise ValueError(f"{name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: "gpu[03-05,9],cpu1" -> "gpu03"; "a1,a2" -> "a1"."""
    return expand_nodelist(nodelist)[0]


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list, expanded: "n[01-03,7],m1" -> ["n01", "n02", "n03", "n7", "m1"].
    Zero padding is kept; several bracket groups in one name ("r[1-2]n[1-2]") expand as a product."""
    entries, depth, current = [], 0, ""
    for ch in nodelist.strip():
        if ch == "," and depth == 0:
            entries.append(current)
            current = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        current += ch
    entries.append(current)
    hosts: list[str] = []
    for entry in filter(None, (e.strip() for e in entries)):
        names = [""]
        for literal, group in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", entry):
            names = [n + literal for n in names]
            if group:
                values = []
                for part in group.split(","):
                    lo, _, hi = part.partition("-")
                    if hi:
                        values += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
                    else:
                        values.append(lo)
                names = [n + v for n in names for v in values]
        hosts += names
    if not hosts:
        raise ValueError(f"empty Slurm node list {nodelist!r}")
    return hosts


def job_port(job_id: str) -> int:
    """The rendezvous port of a Slurm job: the same on every task and after a requeue (the job id stays)."""
    base = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return 15000 + base % 20000


def slurm_port(env: Mapping[str, str]) -> int:
    if env.get("MASTER_PORT"):
        return _int(env, "MASTER_PORT")
    return job_port(env.get("SLURM_JOB_ID", "0").strip() or "0")


def detect(env: Mapping[str, str] | None = None, hfai: bool | None = None) -> Launch:
    """The launch this process belongs to, by the rules in the module docstring."""
    env = os.environ if env is None else env
    hfai = hfai_available() if hfai is None else hfai
    if hfai and env.get("MASTER_IP") and not env.get(SPAWNED_FLAG):
        nodes, node_rank = _int(env, "WORLD_SIZE", 1), _int(env, "RANK", 0)
        per_node = _int(env, PROCS_PER_NODE, 0) or _gpu_count() or 1
        return Launch("hfai", node_rank * per_node, nodes * per_node, 0, env["MASTER_IP"],
                      _int(env, "MASTER_PORT", 29500), nodes, node_rank, per_node)
    if "RANK" in env and "WORLD_SIZE" in env:
        kind = "hfai" if env.get(SPAWNED_FLAG) == "hfai" else "torchrun"
        return Launch(kind, _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK", 0),
                      env.get("MASTER_ADDR"), _int(env, "MASTER_PORT", 29500) if env.get("MASTER_PORT") else None,
                      _int(env, "GROUP_WORLD_SIZE", 1), _int(env, "GROUP_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_LOCALID" in env:
        world = _int(env, "SLURM_STEP_NUM_TASKS", 0) or _int(env, "SLURM_NTASKS", 1)
        if world > 1:
            nodes = _int(env, "SLURM_STEP_NUM_NODES", 0) or _int(env, "SLURM_NNODES", 1)
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
            return Launch("slurm", _int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID"),
                          first_host(nodelist), slurm_port(env), nodes, _int(env, "SLURM_NODEID", 0))
    return Launch("plain")


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def export_env(launch: Launch, env: dict | None = None) -> None:
    """Write the launch back as the variables torch.distributed's env:// rendezvous reads."""
    env = os.environ if env is None else env
    env.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(launch.local_rank))
    if launch.master_addr:
        env["MASTER_ADDR"] = launch.master_addr
    if launch.master_port:
        env["MASTER_PORT"] = str(launch.master_port)


def is_restart(env: Mapping[str, str] | None = None) -> bool:
    """True in a process that an elastic agent (torchrun --max-restarts) or a Slurm requeue started again:
    the trainers then resume from OUT_DIR/latest.pt even without --resume."""
    env = os.environ if env is None else env
    return any(_int(env, name, 0) > 0 for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")
               if env.get(name, "").strip().isdigit())


# --------------------------------------------------------------------------------------------------
# hfai: one process per node, so the runtime starts the per-GPU processes itself

def spawn_per_gpu(launch: Launch, entry, *args) -> None:
    """Run entry(*args) in launch.procs_per_node processes on this node (hfai), each with the torchrun-style
    variables of its global rank set, then return; a failed process raises here."""
    import torch.multiprocessing as mp

    try:
        mp.spawn(_spawned, args=(launch, entry, args), nprocs=launch.procs_per_node, join=True)
    except mp.ProcessExitedException as e:  # the process printed its own error (one line for user errors)
        raise SystemExit(e.exit_code or 1) from None


def _spawned(local_rank: int, launch: Launch, entry, args) -> None:
    os.environ[SPAWNED_FLAG] = "hfai"
    rank = launch.node_rank * launch.procs_per_node + local_rank
    export_env(Launch("hfai", rank, launch.world_size, local_rank, launch.master_addr, launch.master_port,
                      launch.nodes, launch.node_rank))
    entry(*args)


def hfai_client():
    """hfai's client module (receive_suspend_command, go_suspend), wherever this hfai version keeps them."""
    import hfai

    client = getattr(hfai, "client", None)
    if client is not None and hasattr(client, "receive_suspend_command"):
        return client
    return hfai
