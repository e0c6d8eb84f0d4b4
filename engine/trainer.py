"""The scaffolding the three trainers share around their training step, so that each trainer's `main` reads as
its recipe: models, loss, step, validation.

    run = Run(args, "gpt", best_key="best_val_loss", higher_is_better=False)  # process group, seed, resume state
    ema = run.restore_weights({"model": raw}, args.ema_decay)               # resumed weights, EMA
    run.restore_training({"optimizer": opt})                                # optimizers, loss scaler, RNG
    run.start("gpt tiny: ...")                                              # logger, header line, stop signals
    for batch in run.batches(train_loader):                                 # until max_steps or a stop
        ...; run.precision.step(loss, opt, params, max_norm); run.precision.update(); run.advance(n_items)
        run.checkpoint(is_best, lambda: {...})                              # save on rank 0, or stop
    run.finish("val loss ...")                                              # summary line, clean-up

A run resumed from a checkpoint (--resume, or a restart, see CheckpointManager.resolve) continues it; only a
run that starts afresh reads --init-from (run.init_from), so a requeued fine-tuning job continues too.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from engine import checkpoint as ckpt
from engine import data
from engine import distributed as D
from engine.ema import EMA
from engine.errors import UsageError
from engine.logs import Logger
from engine.signals import StopRequest


class Precision:
    """--precision as a training step uses it: `autocast` for the forward and, under fp16, a GradScaler that
    multiplies the loss before backward (fp16 gradients would underflow) and skips the optimizer step whose
    gradients overflowed, halving the scale; bf16 and fp32 need no scaling (the scaler is then a no-op)."""

    def __init__(self, precision: str, device: torch.device, sharded: bool = False):
        self.dtype = D.autocast_dtype(precision, device)
        self.autocast = torch.autocast(device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)
        fp16 = self.dtype == torch.float16
        if sharded:  # FSDP: each rank holds a shard of the gradients, so overflow is agreed over the ranks
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(device.type, enabled=fp16)
        else:
            self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)
        self.overflow_steps = 0  # steps the scaler skipped since this process started

    @property
    def label(self) -> str:
        return {torch.bfloat16: " in bf16", torch.float16: " in fp16"}.get(self.dtype, "")

    def step(self, loss: torch.Tensor, opt: torch.optim.Optimizer, params: Iterable | None = None,
             max_norm: float | None = None) -> torch.Tensor | None:
        """zero_grad, backward of the (scaled) loss, optionally clip the unscaled gradients of `params` to
        max_norm, optimizer step (skipped by the scaler on overflow). Returns the gradient norm if clipped."""
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        norm = None
        if max_norm is not None:
            self.scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.scaler.step(opt)
        return norm

    def update(self) -> None:
        """Once per training step, after every optimizer's step."""
        if not self.scaler.is_enabled():
            return
        before = self.scaler.get_scale()
        self.scaler.update()
        self.overflow_steps += self.scaler.get_scale() < before

    def scalars(self) -> dict:
        return {"amp/loss_scale": self.scaler.get_scale(), "amp/overflow_steps": self.overflow_steps} \
            if self.scaler.is_enabled() else {}


class RankCount:
    """A count each rank adds to on its own (images skipped in its share of each batch), read as the sum over
    ranks: checkpoints, logs and the summary report the whole run's count, and a resumed run starts from it
    whatever its number of processes."""

    def __init__(self, resumed_total: int = 0):
        self.base, self.local = int(resumed_total), 0

    def add(self, n) -> None:
        self.local += int(n)

    def total(self, device: torch.device) -> int:
        """A collective: every rank calls it at the same point."""
        t = torch.tensor([self.local], dtype=torch.int64, device=device)
        return self.base + int(D.all_reduce_sum(t).item())


class NonFiniteGuard:
    """Skip the update of a step whose loss is not finite on some rank (on every rank: they must agree),
    keeping the step, so the data position stays the step count; stop after `limit` in a row. Under fp16
    this is the forward's overflow; gradients that overflow are the loss scaler's to skip (Precision)."""

    def __init__(self, limit: int, total: int = 0):
        self.limit, self.total, self.in_a_row = limit, int(total), 0

    def skip(self, loss: torch.Tensor, run: "Run") -> bool:
        if not D.any_rank(not torch.isfinite(loss).item(), run.env.device):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.total += 1
        run.log.print(f"step {run.step}: non-finite loss, update skipped ({self.in_a_row} in a row)")
        if self.in_a_row >= self.limit:
            raise UsageError(f"{self.in_a_row} non-finite losses in a row at step {run.step}: lower --lr "
                             f"or use --precision fp32; last good checkpoint: {run.manager.latest}")
        return True


class Run:
    """One training run's process group, output folder, resume state, precision, step count, logger, stop
    requests and checkpoints. `best_key` names the checkpoint entry of the best validation value so far."""

    def __init__(self, args, kind: str, best_key: str, higher_is_better: bool = True, best_start: float | None = None):
        self.args, self.kind, self.best_key, self.higher = args, kind, best_key, higher_is_better
        self.env = env = D.setup(args.device)
        D.seed_everything(args.seed, env.rank)
        self.out = Path(args.out_dir)
        self.manager = ckpt.CheckpointManager(self.out)
        self.lock, self.stale = self.take_out_dir()
        self.state = self.manager.load_resume(args.resume, kind)
        if self.manager.fallback_note and env.is_main:
            print(f"warning: {self.manager.fallback_note}", file=sys.stderr, flush=True)
        self.check_max_steps()
        if args.batch_size % env.world_size:
            raise UsageError(f"--batch-size {args.batch_size} is not divisible by {env.world_size} processes")
        sharded = getattr(args, "strategy", "ddp") == "fsdp" and env.distributed
        self.precision = Precision(args.precision, env.device, sharded)
        self.step = self.state["step"] if self.state else 0
        if best_start is None:
            best_start = -math.inf if higher_is_better else math.inf
        self.best = self.resumed(best_key, best_start)
        # --init-from only starts a run: a resumed one (a requeued job, say) continues its own checkpoint.
        given = getattr(args, "init_from", None)
        self.init_from = None if self.state else given
        self.ignored_init = given if self.state else None
        self.ema: EMA | None = None
        self.sampler = None
        self.log: Logger | None = None
        self.stop: StopRequest | None = None
        self.stopped = False

    def take_out_dir(self) -> tuple[ckpt.OutDirLock | None, tuple[int, int]]:
        """Rank 0 locks the output folder for the life of the run (refused, on every rank, while another run
        holds it) and then removes the temporaries a killed run left there. Returns (lock, (files, bytes)
        removed)."""
        refused: UsageError | None = None
        lock, stale = None, (0, 0)
        if self.env.is_main:
            try:
                lock = ckpt.OutDirLock(self.out).acquire()
            except UsageError as e:
                refused = e
            else:
                stale = self.manager.remove_stale_temps()
        if D.any_rank(refused is not None, self.env.device):  # every rank stops, not only rank 0
            raise refused or UsageError(f"rank 0 cannot use --out-dir {self.out} (its error says why)")
        return lock, stale

    def check_max_steps(self) -> None:
        """A checkpoint past --max-steps cannot be rewound: refused. One at it is a finished run (a stage of
        scripts/*.sh re-run, a requeue after the last save): start() says there is nothing to train."""
        if self.state and self.state["step"] > self.args.max_steps:
            raise UsageError(f"the checkpoint to resume is at step {self.state['step']}, past --max-steps "
                             f"{self.args.max_steps}: pass a --max-steps above {self.state['step']} to train on, "
                             "or another --out-dir to start afresh")

    def resumed(self, key: str, default):
        """The checkpoint's value of `key` when resuming, else `default`."""
        return self.state[key] if self.state else default

    # ------------------------------------------------------------------------------------------ resume
    def restore_weights(self, modules: dict, ema_decay: float) -> EMA | None:
        """Resuming: each module's weights from the checkpoint entry named by its key. Then the EMA of
        modules["model"] (ema_decay > 0), from the checkpoint's "ema" where it has one."""
        if self.state:
            for key, module in modules.items():
                module.load_state_dict(self.state[key])
        self.ema = EMA(modules["model"], ema_decay) if ema_decay > 0 else None
        if self.ema is not None and self.state and "ema" in self.state:
            self.ema.load_state_dict(self.state["ema"], self.state.get("ema_updates", self.state["step"]))
        return self.ema

    def restore_training(self, optimizers: dict, load: Callable = ckpt.load_optimizer_state) -> None:
        """Resuming: each optimizer's state (entry named by its key, loaded by `load(opt, state)`), the loss
        scaler's and this rank's RNG streams. Call it after every model is built: building draws numbers."""
        if not self.state:
            return
        for key, opt in optimizers.items():
            load(opt, self.state[key])
        if self.precision.scaler.is_enabled() and self.state.get("scaler"):  # {} from a run without fp16
            self.precision.scaler.load_state_dict(self.state["scaler"])
        rngs = self.state["rng"]
        ckpt.set_rng_state(rngs[self.env.rank] if len(rngs) == self.env.world_size else rngs[0])

    # -------------------------------------------------------------------------------------------- data
    def train_loader(self, dataset, collate_fn=None):
        """The endless training loader from this run's step on: a stream (--stream) or a map-style dataset."""
        a, env = self.args, self.env
        if isinstance(dataset, torch.utils.data.IterableDataset):
            loader, self.sampler = data.stream_loader(dataset, a.batch_size, env, self.step, a.num_workers, collate_fn)
        else:
            loader, self.sampler = data.train_loader(dataset, a.batch_size, env, a.seed, self.step, a.num_workers,
                                                     collate_fn)
        return loader

    def val_loader(self, dataset):
        return data.val_loader(dataset, self.args.batch_size, self.env, self.args.num_workers)

    # -------------------------------------------------------------------------------------------- loop
    def start(self, header: str, note: str = "") -> None:
        """The logger and the header line (`header`, then processes, device, precision, where it starts);
        from here on SIGTERM/SIGUSR1 (or hfai's suspend) ask for a save and a clean stop."""
        a, env = self.args, self.env
        self.log = Logger(self.out, env.is_main, a.max_steps, self.step, tensorboard=not a.no_tensorboard)
        if self.state:
            where = f"resuming at step {self.step}"
            if self.ignored_init:
                where += f" (--init-from {self.ignored_init} ignored: a resumed run continues its checkpoint)"
            if self.manager.fallback_note:
                where += f" ({self.manager.fallback_note})"
        else:
            where = f"fine-tuning {self.init_from}" if self.init_from else "from scratch"
        self.log.print(f"{header} | {env.world_size} process(es){note} on {env.device}{self.precision.label} | "
                       f"{where} | out {self.out}")
        if self.stale[0]:
            self.log.print(f"removed {self.stale[0]} temporary file(s) ({self.stale[1] / 2**20:.1f} MiB) that a "
                           f"killed run left in {self.out}")
        if self.step >= a.max_steps:
            self.log.print(f"nothing to train: the run is already at step {self.step} of --max-steps "
                           f"{a.max_steps}; pass a larger --max-steps to train on")
        self.stop = StopRequest()
        self.t_start = self.t_log = time.time()
        self.items_since_log = 0

    def batches(self, loader) -> Iterator:
        """The loader's batches until --max-steps or until a stop request was saved (see checkpoint)."""
        it = iter(loader)
        while self.step < self.args.max_steps and not self.stopped:
            yield next(it)

    def advance(self, items: int, postfix: dict | None = None) -> None:
        """One step done; `items` (images, tokens) this rank processed count toward the throughput."""
        self.step += 1
        self.items_since_log += items * self.env.world_size
        self.log.advance(1, postfix)

    def due(self, every: int) -> bool:
        """Whether something done every `every` steps (0 = only at the end) is due at this step."""
        return bool(every and self.step % every == 0) or self.step == self.args.max_steps

    def throughput(self) -> float:
        """Items per second (all ranks) since the last call; call it once per log line."""
        now = time.time()
        rate = self.items_since_log / max(now - self.t_log, 1e-9)
        self.t_log, self.items_since_log = now, 0
        return rate

    def improved(self, value: float) -> bool:
        """Track the best validation value; True when `value` beats it."""
        better = value > self.best if self.higher else value < self.best
        self.best = max(self.best, value) if self.higher else min(self.best, value)
        return better

    def checkpoint(self, is_best: bool, entries: Callable[[], dict]) -> bool:
        """At a save point (a stop request on any rank, a new best, every --save-every steps, the end):
        `entries()` on every rank (it may gather sharded tensors), saved with the run's own entries by rank 0
        (latest.pt; best.pt; step_N.pt every --keep-every), then a barrier. After a stop request the loop
        ends (batches() yields no more); returns whether it did."""
        a, step = self.args, self.step
        self.stopped = D.any_rank(self.stop.requested, self.env.device)
        if self.stopped or is_best or step % a.save_every == 0 or step == a.max_steps:
            rngs = ckpt.gather_rng_states()
            parts = entries()
            if self.env.is_main:
                state = {"kind": self.kind, **parts, "scaler": self.precision.scaler.state_dict(), "step": step,
                         "epoch": self.sampler.epoch_of(step), self.best_key: self.best, "rng": rngs,
                         "train_args": vars(a)}
                if self.ema is not None:
                    state["ema"] = parts["ema"] if "ema" in parts else self.ema.state_dict()
                    state["ema_updates"] = self.ema.updates
                self.manager.save(state, step, periodic=a.keep_every > 0 and step % a.keep_every == 0, best=is_best)
            D.barrier()
        if self.stopped:
            self.log.print(f"received {self.stop.name or 'a stop signal'}: saved {self.manager.latest} at step "
                           f"{step}; continue with --resume auto")
        return self.stopped

    def finish(self, summary: str | None) -> None:
        """The `done:` line (rank 0, when there is a summary), then close the logger and the process group."""
        if summary and self.env.is_main:
            self.log.print(f"done: step {self.step}, {(time.time() - self.t_start) / 60:.1f} min, {summary}, "
                           f"checkpoints in {self.out}")
        self.log.close()
        self.stop.restore()
        D.cleanup()
        if self.lock is not None:
            self.lock.release()
