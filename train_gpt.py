"""Stage 2: train the GPT that writes VQGAN token grids from CLIP embeddings.

    python train_gpt.py --vqgan runs/vqgan-shapes/best.pt --clip runs/clip-shapes/best.pt \\
        --shards runs/encoded                                   # from pre-encoded shards (preencode.py)
    python train_gpt.py --vqgan ... --clip ... --dataset folder --data-path imgs/   # encode on the fly
    torchrun --nproc_per_node 8 train_gpt.py ...

Language-free: the condition is the CLIP *image* embedding of each training image; no caption reaches
the GPT (--cond image, the default). At inference a CLIP *text* embedding takes its place. --embed-noise
adds Gaussian noise to the normalised embedding (then renormalises) to cover the gap between image and
text embeddings; --cond-drop trains the null condition used by classifier-free guidance. --cond text
trains on caption embeddings instead: the supervised upper bound, for comparison only.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.utils import make_grid, save_image

import datasets
from datasets.encoded import EncodedShards
from engine import checkpoint as ckpt
from engine import data
from engine import distributed as D
from engine import fsdp as FS
from engine.cli import UsageError, run
from engine.ema import EMA
from engine.logs import Logger
from engine.schedule import lr_at, set_lr
from engine.signals import StopRequest
from models.clip import load_clip
from models.convert import load_vqgan
from models.gpt import GPT, PRESETS, GPTConfig, build_gpt

DEFAULT_PROMPTS = ["a red circle in the top left", "a blue square at the bottom", "a large green triangle",
                   "a small yellow diamond on the right"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vqgan", required=True, help="frozen VQGAN checkpoint (ours, CLIP-GEN or taming)")
    p.add_argument("--clip", required=True, help="frozen CLIP: checkpoint path or open_clip NAME:TAG")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="GPT size")
    p.add_argument("--n-prefix", type=int, default=1, help="prefix tokens the CLIP embedding becomes")
    p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    p.add_argument("--out-dir", default=None, help="default runs/gpt-PRESET")
    p.add_argument("--shards", default=None, help="pre-encoded folder (OUT of preencode.py: train/, val/)")
    datasets.add_data_args(p)
    g = p.add_argument_group("conditioning")
    g.add_argument("--cond", choices=["image", "text"], default="image",
                   help="image: language-free (CLIP image embedding); text: caption embedding (comparison)")
    g.add_argument("--embed-noise", type=float, default=0.0, help="std of noise on the normalised embedding")
    g.add_argument("--cond-drop", type=float, default=0.1, help="probability of the null condition (CFG)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=64, help="global batch, split over processes")
    g.add_argument("--lr", type=float, default=6e-4)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--warmup-steps", type=int, default=200)
    g.add_argument("--max-steps", type=int, default=5000)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--strategy", choices=FS.STRATEGIES, default="ddp",
                   help="with several processes: ddp (a full copy per rank) or fsdp (parameters, gradients and "
                        "optimizer state sharded over the ranks; checkpoints are the same full state dicts)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward (one-off compile time; measured no faster on a CPU, "
                        "see README Performance)")
    g.add_argument("--ema-decay", type=float, default=0.999, help="0 = no EMA")
    g.add_argument("--max-nonfinite", type=int, default=10, help="stop after this many non-finite losses in a row")
    g = p.add_argument_group("run")
    g.add_argument("--resume", default=None, help="checkpoint path, or 'auto' for OUT_DIR/latest.pt")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    g.add_argument("--num-workers", type=int, default=1)
    g.add_argument("--log-every", type=int, default=50)
    g.add_argument("--val-every", type=int, default=500)
    g.add_argument("--val-batches", type=int, default=0, help="limit validation batches (0 = all)")
    g.add_argument("--sample-every", type=int, default=1000, help="sample grid cadence (0 = only at the end)")
    g.add_argument("--prompts", nargs="*", default=DEFAULT_PROMPTS, help="text prompts for sample grids")
    g.add_argument("--sample-cfg", type=float, default=1.0, help="guidance scale for sample grids")
    g.add_argument("--save-every", type=int, default=500)
    g.add_argument("--keep-every", type=int, default=10_000)
    g.add_argument("--no-tensorboard", action="store_true")
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or f"runs/gpt-{args.preset}"
    if args.cond == "text" and args.dataset == "shapes":
        args.shapes_split = "captioned"  # captions exist only in the captioned split
    return args


def noisy(cond: torch.Tensor, std: float) -> torch.Tensor:
    """Gaussian noise on the unit sphere's neighbourhood, projected back onto it."""
    if std <= 0:
        return cond
    return F.normalize(cond + std * torch.randn_like(cond), dim=-1)


class Conditioner:
    """Turns a batch (pre-encoded or raw images) into (tokens (B, T) long, cond (B, D) float)."""

    def __init__(self, vqgan, clip, cond: str, device, autocast):
        self.vqgan, self.clip, self.cond, self.device, self.autocast = vqgan, clip, cond, device, autocast

    @torch.no_grad()
    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "tokens" in batch:  # pre-encoded
            tokens = batch["tokens"].to(self.device, non_blocking=True)
            key = "text_embed" if self.cond == "text" else "image_embed"
            cond = batch[key].to(self.device, non_blocking=True)
        else:
            images = batch["image"].to(self.device, non_blocking=True)
            with self.autocast:
                _, tokens, _, _ = self.vqgan.encode(images)
            cond = (self.clip.encode_text(list(batch["caption"])) if self.cond == "text"
                    else self.clip.encode_image(images))
        return tokens.flatten(1).long(), cond.float()


def build_data(args, env, vqgan, clip):
    if args.shards and args.stream:
        raise UsageError("--stream streams images (--dataset tar); --shards are pre-encoded: use one of them")
    if args.shards:
        train_ds, val_ds = EncodedShards(Path(args.shards) / "train"), EncodedShards(Path(args.shards) / "val")
        meta = train_ds.meta
        if meta["n_codes"] != vqgan.cfg.n_codes or meta["grid_size"] != vqgan.cfg.grid_size:
            raise UsageError(f"{args.shards} was encoded with a VQGAN of {meta['n_codes']} codes on a "
                             f"{meta['grid_size']}² grid; --vqgan has {vqgan.cfg.n_codes} on "
                             f"{vqgan.cfg.grid_size}²: re-run preencode.py with this VQGAN")
        if meta["embed_dim"] != clip.embed_dim:
            raise UsageError(f"{args.shards} holds {meta['embed_dim']}-d CLIP embeddings; --clip gives "
                             f"{clip.embed_dim}-d: re-run preencode.py with this CLIP")
        if args.cond == "text" and not train_ds.has_text:
            raise UsageError(f"--cond text needs caption embeddings; {args.shards} has none (encode a "
                             "captioned dataset, e.g. --shapes-split captioned)")
    else:
        train_ds, val_ds = datasets.build_datasets(args, vqgan.cfg.resolution, streaming=True)
        if args.cond == "text" and not datasets.has_captions(train_ds):
            raise UsageError(f"--cond text needs captions; --dataset {args.dataset} has none")
    return train_ds, val_ds


@torch.no_grad()
def validate(model: GPT, loader, conditioner, max_batches: int = 0) -> dict:
    """Mean next-token loss and token accuracy (argmax = target) over this rank's share, summed over ranks."""
    was_training = model.training
    model.eval()
    dev = conditioner.device
    sums = torch.zeros(3, dtype=torch.float64, device=dev)  # loss * tokens, correct, tokens
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        tokens, cond = conditioner(batch)
        with conditioner.autocast:
            logits = model(tokens, cond)
        logits = logits.float()
        sums[0] += F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="sum").double()
        sums[1] += (logits.argmax(-1) == tokens).sum().double()
        sums[2] += tokens.numel()
    D.all_reduce_sum(sums)
    model.train(was_training)
    n = max(1.0, sums[2].item())
    return {"val/loss": sums[0].item() / n, "val/token_accuracy": sums[1].item() / n}


@torch.no_grad()
def sample_grid(model: GPT, vqgan, clip, val_ds, conditioner, prompts, cfg_scale: float, seed: int):
    """Top row: held-out images; second: samples from their image embeddings; then one row per prompt."""
    n = min(8, len(val_ds))
    batch = torch.utils.data.default_collate([val_ds[i] for i in range(n)])
    tokens, _ = conditioner(batch)
    image_cond = batch["image_embed"].to(conditioner.device) if "image_embed" in batch else \
        clip.encode_image(batch["image"].to(conditioner.device))
    side = vqgan.cfg.grid_size
    g = torch.Generator(device=conditioner.device).manual_seed(seed)
    rows = [vqgan.decode_indices(tokens.view(n, side, side))]
    conds = [image_cond.float()] + [clip.encode_text([p] * n) for p in prompts]
    for cond in conds:
        with conditioner.autocast:
            out = model.sample(cond, top_k=None, cfg_scale=cfg_scale, generator=g)
        rows.append(vqgan.decode_indices(out.view(n, side, side)))
    images = torch.cat(rows).float().clamp(-1, 1).add(1).div(2)
    return make_grid(images, nrow=n, padding=2, pad_value=1.0)


def main(args) -> None:
    env = D.setup(args.device)
    D.seed_everything(args.seed, env.rank)
    out = Path(args.out_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    manager = ckpt.CheckpointManager(out)
    state = manager.load_resume(args.resume, "gpt")
    if args.batch_size % env.world_size:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by {env.world_size} processes")

    vqgan = load_vqgan(args.vqgan).to(env.device).eval().requires_grad_(False).channels_last()
    clip = load_clip(args.clip, device=env.device)
    amp = D.autocast_dtype(args.precision, env.device)
    autocast = torch.autocast(env.device.type, dtype=amp or torch.float32, enabled=amp is not None)
    conditioner = Conditioner(vqgan, clip, args.cond, env.device, autocast)
    train_ds, val_ds = build_data(args, env, vqgan, clip)

    if state:
        cfg = GPTConfig.from_dict(state["config"])
    else:
        over = {"n_prefix": args.n_prefix, **({"dropout": args.dropout} if args.dropout is not None else {})}
        cfg = build_gpt(args.preset, vocab_size=vqgan.cfg.n_codes, n_tokens=vqgan.cfg.grid_size ** 2,
                        cond_dim=clip.embed_dim, **over).cfg
    if cfg.vocab_size != vqgan.cfg.n_codes or cfg.n_tokens != vqgan.cfg.grid_size ** 2:
        raise UsageError(f"the GPT writes {cfg.n_tokens} tokens of {cfg.vocab_size} codes; the VQGAN has "
                         f"{vqgan.cfg.grid_size ** 2} tokens of {vqgan.cfg.n_codes} codes")
    fsdp = args.strategy == "fsdp" and env.distributed  # one process: nothing to shard
    raw = GPT(cfg).to(env.device)
    ema = EMA(raw, args.ema_decay) if args.ema_decay > 0 else None
    step, best, nonfinite_total = 0, float("inf"), 0
    if state:  # full state dicts, loaded before any sharding: the same under either strategy
        raw.load_state_dict(state["model"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"], state.get("ema_updates", state["step"]))
        step, best, nonfinite_total = state["step"], state["best_val_loss"], state["nonfinite_steps"]
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[env.rank] if len(rngs) == env.world_size else rngs[0])
    if fsdp:  # the EMA is sharded the same way, so its update stays a local op on each rank's shard
        FS.shard(raw, env.device)
        if ema is not None:
            FS.shard(ema.model, env.device)
    opt = torch.optim.AdamW(raw.param_groups(args.weight_decay), lr=args.lr, betas=(0.9, 0.95),
                            fused=D.fused_optimizer(env.device))
    if state:
        if fsdp:
            FS.load_optimizer_state(raw, opt, state["optimizer"])
        else:
            ckpt.load_optimizer_state(opt, state["optimizer"])
    model = DDP(raw) if env.distributed and not fsdp else raw
    if args.compile:  # training forward only: validation, EMA, sampling and checkpoints use the plain modules
        model = torch.compile(model)
    if isinstance(train_ds, torch.utils.data.IterableDataset):  # --stream
        train_loader, sampler = data.stream_loader(train_ds, args.batch_size, env, step, args.num_workers)
    else:
        train_loader, sampler = data.train_loader(train_ds, args.batch_size, env, args.seed, step, args.num_workers)
    val_loader = data.val_loader(val_ds, args.batch_size, env, args.num_workers)

    log = Logger(out, env.is_main, args.max_steps, step, tensorboard=not args.no_tensorboard)
    log.print(f"gpt {args.preset}: {sum(p.numel() for p in raw.parameters()) / 1e6:.1f}M params, "
              f"{cfg.n_tokens} tokens of {cfg.vocab_size} codes, cond {args.cond} ({cfg.cond_dim}-d, noise "
              f"{args.embed_noise}, drop {args.cond_drop}) | {'shards ' + args.shards if args.shards else 'on the fly'}"
              f" | {env.world_size} process(es){' (fsdp)' if fsdp else ''} on {env.device}{' in bf16' if amp else ''} | "
              f"{'resuming at step ' + str(step) if step else 'from scratch'} | out {out}")
    stop = StopRequest()
    t_start, t_log, tokens_since = time.time(), time.time(), 0
    metrics: dict = {}
    nonfinite_run = 0
    data_iter = iter(train_loader)
    raw.train()
    while step < args.max_steps:
        tokens, cond = conditioner(next(data_iter))
        cond = noisy(cond, args.embed_noise)
        drop = torch.rand(cond.shape[0], device=env.device) < args.cond_drop
        lr = lr_at(step, args.lr, args.warmup_steps, args.max_steps, "cosine")
        set_lr([opt], lr)
        with autocast:
            logits = model(tokens, cond, drop)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        opt.zero_grad(set_to_none=True)
        grad_norm = torch.tensor(0.0)
        if D.any_rank(not torch.isfinite(loss).item(), env.device):
            # Skip this update on every rank (ranks must agree) but keep the step, so the data position
            # stays the step count; stop if it keeps happening.
            nonfinite_run += 1
            nonfinite_total += 1
            log.print(f"step {step}: non-finite loss, update skipped ({nonfinite_run} in a row)")
            if nonfinite_run >= args.max_nonfinite:
                raise UsageError(f"{nonfinite_run} non-finite losses in a row at step {step}: lower --lr "
                                 f"or use --precision fp32; last good checkpoint: {manager.latest}")
        else:
            nonfinite_run = 0
            loss.backward()
            if args.grad_clip > 0:
                grad_norm = FS.full_value(torch.nn.utils.clip_grad_norm_(raw.parameters(), args.grad_clip))
            opt.step()
            if ema is not None:
                ema.update(raw)
        step += 1
        tokens_since += tokens.numel() * env.world_size
        log.advance(1, {"loss": loss.detach()})

        if step % args.log_every == 0 or step == args.max_steps:
            dt = max(time.time() - t_log, 1e-9)
            log.scalars({"loss/train": loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                         "perf/tokens_per_s": tokens_since / dt, "nonfinite_steps": nonfinite_total}, step)
            log.print(f"step {step}/{args.max_steps} loss {loss.item():.4f} {tokens_since / dt:.0f} tok/s")
            t_log, tokens_since = time.time(), 0

        eval_model = ema.model if ema is not None else raw
        is_best = False
        if step % args.val_every == 0 or step == args.max_steps:
            metrics = validate(eval_model, val_loader, conditioner, args.val_batches)
            log.scalars(metrics, step)
            log.print(f"val loss {metrics['val/loss']:.4f} token accuracy {metrics['val/token_accuracy']:.3f}")
            is_best = metrics["val/loss"] < best
            best = min(best, metrics["val/loss"])
        if (args.sample_every and step % args.sample_every == 0) or step == args.max_steps:
            # Sampling calls the model's parts one by one (KV cache), which FSDP's sharded root does not
            # gather for: sample from a gathered, ordinary copy on rank 0 instead.
            sampler_model = eval_model
            if fsdp:
                full = FS.full_model_state(eval_model)
                sampler_model = GPT(cfg).to(env.device).eval() if env.is_main else None
                if env.is_main:
                    sampler_model.load_state_dict(full)
        if env.is_main and ((args.sample_every and step % args.sample_every == 0) or step == args.max_steps):
            grid = sample_grid(sampler_model, vqgan, clip, val_ds, conditioner, args.prompts, args.sample_cfg,
                               args.seed)
            save_image(grid, out / "samples.png")
            log.image("samples (rows: real, from image embedding, from each prompt)", grid, step)

        stopping = D.any_rank(stop.requested, env.device)
        if stopping or is_best or step % args.save_every == 0 or step == args.max_steps:
            rngs = ckpt.gather_rng_states()
            if fsdp:  # collectives: every rank takes part, rank 0 receives the full tensors
                model_sd, opt_sd = FS.full_model_state(raw), FS.full_optimizer_state(raw, opt)
                ema_sd = FS.full_model_state(ema.model) if ema is not None else None
            elif env.is_main:
                model_sd, opt_sd = raw.state_dict(), opt.state_dict()
                ema_sd = ema.state_dict() if ema is not None else None
            if env.is_main:
                state = {"kind": "gpt", "config": cfg.to_dict(), "model": model_sd,
                         "optimizer": opt_sd, "step": step, "epoch": sampler.epoch_of(step),
                         "best_val_loss": best, "nonfinite_steps": nonfinite_total, "rng": rngs,
                         "conditioning": {"cond": args.cond, "embed_noise": args.embed_noise,
                                          "cond_drop": args.cond_drop, "clip": str(args.clip),
                                          "vqgan": str(args.vqgan)},
                         "train_args": vars(args)}
                if ema is not None:
                    state["ema"], state["ema_updates"] = ema_sd, ema.updates
                manager.save(state, step, periodic=args.keep_every > 0 and step % args.keep_every == 0,
                             best=is_best)
            D.barrier()
        if stopping:
            log.print(f"received {stop.name or 'a stop signal'}: saved {manager.latest} at step {step}; "
                      "continue with --resume auto")
            break

    if metrics and env.is_main:
        log.print(f"done: step {step}, {(time.time() - t_start) / 60:.1f} min, val loss {metrics['val/loss']:.4f}, "
                  f"token accuracy {metrics['val/token_accuracy']:.3f}, non-finite steps {nonfinite_total}, "
                  f"checkpoints in {out}")
    log.close()
    stop.restore()
    D.cleanup()


if __name__ == "__main__":
    run(main, parse_args())
