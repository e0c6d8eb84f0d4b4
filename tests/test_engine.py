"""engine/ on its own: checkpoint writes leave the process umask alone, the engine imports nothing of the
layers above it (and models/ nothing of datasets/), and the trainers' shared pieces (skip counts summed over
ranks, fp16 loss scaling, the non-finite guard) do what the trainers rely on."""
import ast
import os
import stat
import subprocess
import sys

import pytest
import torch

from engine import checkpoint as ckpt
from tests.conftest import REPO

# --- umask ----------------------------------------------------------------------------------------------


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


@pytest.mark.parametrize("proc", ["linux", "no /proc"])
def test_checkpoint_write_never_changes_the_umask(tmp_path, monkeypatch, umask_027, proc):
    """Setting the umask to read it (os.umask(0), then back) gives other threads' files mode 0o666 meanwhile;
    a save must only read it, and the file must still get 0o666 less the umask, with or without /proc."""
    if proc == "no /proc":
        monkeypatch.setattr(ckpt, "_PROC_STATUS", str(tmp_path / "no-such-file"))
    calls = []
    real_umask = os.umask
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real_umask(mask))
    ckpt.atomic_save({"step": 1}, tmp_path / "run" / "latest.pt")
    ckpt.save_weights(tmp_path / "run" / "w.safetensors", "vqgan", {}, {"w": torch.ones(2)})
    monkeypatch.undo()
    assert calls == []
    for name in ("latest.pt", "w.safetensors"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o640  # 0o666 & ~0o027
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["latest.pt", "w.safetensors"]  # no probe left


# --- dependency order -------------------------------------------------------------------------------------

def _imports(path) -> set[str]:
    """Top-level package of every import in the file, at module level or inside functions (lazy imports)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package,above", [
    ("engine", {"datasets", "models", "evaluation", "train_vqgan", "train_gpt", "train_clip", "demo", "evaluate"}),
    ("models", {"datasets", "evaluation", "train_vqgan", "train_gpt", "train_clip", "demo", "evaluate"}),
    ("datasets", {"evaluation", "train_vqgan", "train_gpt", "train_clip", "demo", "evaluate", "preencode"}),
])
def test_no_module_imports_a_layer_above_it(package, above):
    """scripts -> datasets -> models -> engine -> nothing of ours: an import pointing up (even one inside a
    function) is a cycle waiting to happen."""
    bad = {f"{p.relative_to(REPO)}: {sorted(_imports(p) & above)}"
           for p in sorted((REPO / package).glob("*.py")) if _imports(p) & above}
    assert not bad, bad


def test_importing_any_engine_module_loads_no_datasets_or_models():
    """The same in a fresh interpreter, for what the files' imports pull in transitively."""
    mods = sorted(f"engine.{p.stem}" for p in (REPO / "engine").glob("*.py") if p.stem != "__init__")
    code = ("import importlib, sys\n"
            f"for m in {mods!r}:\n"
            "    importlib.import_module(m)\n"
            "    up = sorted(k for k in sys.modules if k.split('.')[0] in ('datasets', 'models'))\n"
            "    assert not up, (m, up)\n"
            "print('ok', len(sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-2000:]


def test_user_errors_are_one_base_that_every_layer_subclasses():
    from datasets import DataError
    from engine.cli import UsageError, user_errors
    from engine.errors import UserError
    from models.losses import MissingWeightsError

    for cls in (ckpt.CheckpointError, DataError, MissingWeightsError, UsageError):
        assert issubclass(cls, user_errors()), cls
    assert user_errors() == (UserError,)


# --- the trainers' shared pieces ----------------------------------------------------------------------------

def _count_on_rank(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from engine.trainer import RankCount

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    count = RankCount(resumed_total=5)  # a resumed run: 5 skipped before, by however many processes
    for _ in range(3):
        count.add(torch.tensor([rank + 1, rank]).sum())  # rank 0 skips 1 image a batch, rank 1 skips 3
    totals = [count.total(torch.device("cpu")), count.total(torch.device("cpu"))]
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(" ".join(map(str, totals)))
    dist.destroy_process_group()


def test_skip_count_is_the_sum_over_ranks_on_every_rank(tmp_path):
    """Each rank counts the corrupt images of its own share of the batches; logs and checkpoints (written by
    rank 0) must report the run's total, and reading it twice must not count anything twice."""
    import torch.multiprocessing as mp

    from tests.test_train_vqgan import _free_port

    mp.spawn(_count_on_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}").read_text() == "17 17"  # 5 + 3 * (1 + 3)


def test_fp16_scaler_skips_an_overflowing_step_and_halves_the_scale():
    from engine.trainer import Precision

    p = Precision("fp16", torch.device("cpu"))
    assert p.scaler.is_enabled() and p.label == " in fp16"
    lin = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    before = lin.weight.detach().clone()
    with p.autocast:
        y = lin(torch.ones(2, 4))
    assert y.dtype == torch.float16
    p.step(y.float().sum() * float("inf"), opt, lin.parameters(), max_norm=1.0)  # gradients overflow
    p.update()
    assert torch.equal(lin.weight, before) and p.scaler.get_scale() == 2.0 ** 15 and p.overflow_steps == 1
    with p.autocast:
        loss = lin(torch.ones(2, 4)).float().mean()
    norm = p.step(loss, opt, lin.parameters(), max_norm=100.0)
    p.update()
    # The clipped norm is of the true (unscaled) gradients: d(mean of 2 rows)/dW = ones(1, 4), and 1 for the bias.
    assert abs(norm.item() - 5 ** 0.5) < 1e-3
    assert torch.allclose(lin.weight, before - 0.1, atol=1e-3) and p.overflow_steps == 1
    assert p.scalars() == {"amp/loss_scale": 2.0 ** 15, "amp/overflow_steps": 1}
    assert Precision("bf16", torch.device("cpu")).scalars() == {}  # no scaler under bf16 and fp32


@pytest.mark.parametrize("flags,want", [("fpu avx512f avx512_bf16 amx_bf16 amx_tile", torch.bfloat16),
                                        ("fpu avx512f avx512_bf16", None),  # measured slower in bf16
                                        ("fpu avx2", None)])
def test_precision_auto_picks_bf16_on_cpus_with_amx_only(tmp_path, monkeypatch, flags, want):
    import builtins

    from engine import distributed as D

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(cpuinfo if f == "/proc/cpuinfo" else f, *a, **k))
    assert D.autocast_dtype("auto", torch.device("cpu")) is want
    assert D.autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16  # asked for: always
    assert D.autocast_dtype("fp32", torch.device("cpu")) is None
