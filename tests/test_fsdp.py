"""--strategy fsdp: 2 gloo processes with sharded parameters and optimizer state train the same GPT as one
process, and their checkpoints are interchangeable with a plain run's in both directions."""
import sys

import torch

from tests import forkrun
from tests.test_launch import EQUAL, assert_same_model, gpt_cmd
from tests.test_train_vqgan import _env, _free_port, load_state
from tests.conftest import REPO
import subprocess

KEEP = ["--keep-every", "2", "--save-every", "2"]


def run(frozen, args, procs=1):
    prefix = []
    if procs > 1:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                  "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    cmd = gpt_cmd(frozen, args)
    if prefix:
        r = subprocess.run(prefix + cmd[1:], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    else:  # through the fork server (tests/forkrun.py)
        r = forkrun.run(*cmd[1:])
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_fsdp_trains_as_one_process_and_checkpoints_interchange(frozen, tmp_path):
    run(frozen, [*EQUAL, *KEEP, "--out-dir", str(tmp_path / "one")])
    out = run(frozen, [*EQUAL, *KEEP, "--strategy", "fsdp", "--out-dir", str(tmp_path / "fsdp")], procs=2)
    assert "2 process(es) (fsdp)" in out
    one, sharded = tmp_path / "one" / "latest.pt", tmp_path / "fsdp" / "latest.pt"
    assert_same_model(one, sharded)
    a, b = load_state(one), load_state(sharded)
    # Full state dicts with the plain model's names and the ordinary id-keyed optimizer layout.
    assert set(a["model"]) == set(b["model"]) and set(a["ema"]) == set(b["ema"])
    assert all(not hasattr(v, "placements") for v in b["model"].values())
    assert sorted(a["optimizer"]["state"]) == sorted(b["optimizer"]["state"])
    assert [g["params"] for g in a["optimizer"]["param_groups"]] == [g["params"] for g in b["optimizer"]["param_groups"]]
    for i, s in a["optimizer"]["state"].items():
        assert torch.allclose(s["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"], rtol=1e-3, atol=1e-9)
    assert a["ema_updates"] == b["ema_updates"] == 4

    # The FSDP run's step-2 checkpoint continues in one plain process, and the plain run's under FSDP.
    step2 = "step_0000002.pt"
    run(frozen, [*EQUAL, "--resume", str(tmp_path / "fsdp" / step2), "--out-dir", str(tmp_path / "to_plain")])
    run(frozen, [*EQUAL, "--strategy", "fsdp", "--resume", str(tmp_path / "one" / step2),
                 "--out-dir", str(tmp_path / "to_fsdp")], procs=2)
    for resumed in ("to_plain", "to_fsdp"):
        assert_same_model(one, tmp_path / resumed / "latest.pt")  # the weights and the EMA, tensor by tensor
