"""Stage 1: train the VQGAN image tokenizer.

    python train_vqgan.py --preset shapes                      # one process, best device found
    torchrun --nproc_per_node 4 train_vqgan.py --preset f16-16384 --dataset folder --data-path imgs/

Images -> encoder -> nearest codebook entries (a grid of integer tokens) -> decoder -> images, trained
with pixel + perceptual + codebook losses and, from --disc-start on, a PatchGAN. The GPT of stage 2
learns to write these token grids.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.utils import make_grid, save_image

import datasets
from engine import checkpoint as ckpt
from engine import data
from engine import distributed as D
from engine.cli import UsageError, run
from engine.ema import EMA
from engine.logs import Logger
from engine.schedule import lr_at, set_lr
from engine.signals import StopRequest
from models.discriminator import PatchDiscriminator
from models.losses import VQLoss, build_lpips, lpips_available
from models.quantizer import CodeUsage
from models.vqgan import PRESETS, VQGAN, VQGANConfig

# Training defaults per preset; a flag given on the command line wins.
TRAIN_DEFAULTS = {
    "shapes": dict(batch_size=16, lr=4e-4, max_steps=3000, perceptual_weight=0.0, pixel_loss="l1+l2",
                   disc_weight=0.1, disc_start=2000, warmup_steps=100, lr_schedule="cosine"),
    "f16-16384": dict(batch_size=16, lr=1e-4, max_steps=500_000, perceptual_weight=1.0, pixel_loss="l1",
                      disc_weight=0.8, disc_start=50_000, warmup_steps=1000, lr_schedule="constant"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="shapes", help="model size and defaults")
    p.add_argument("--out-dir", default=None, help="checkpoints, logs, grids (default runs/vqgan-PRESET)")
    datasets.add_data_args(p)
    g = p.add_argument_group("model (overrides of the preset)")
    g.add_argument("--n-codes", type=int)
    g.add_argument("--embed-dim", type=int, help="code vector width")
    g.add_argument("--l2-codes", action=argparse.BooleanOptionalAction, default=None,
                   help="l2-normalised code lookup")
    g.add_argument("--restart-threshold", type=float, help="re-seed codes used less than this per batch")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, help="global batch, split over processes")
    g.add_argument("--lr", type=float)
    g.add_argument("--lr-schedule", choices=["constant", "cosine"])
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--max-steps", type=int)
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 = off")
    g.add_argument("--ema-decay", type=float, default=0.0, help="keep an EMA of the weights (0 = off)")
    g = p.add_argument_group("losses")
    g.add_argument("--pixel-loss", choices=["l1", "l2", "l1+l2"])
    g.add_argument("--perceptual-weight", type=float, help="LPIPS weight (needs VGG16 weights)")
    g.add_argument("--lpips-vgg", default=None, help="path to torchvision's vgg16-397923af.pth")
    g.add_argument("--codebook-weight", type=float, default=1.0)
    g.add_argument("--disc-weight", type=float, help="GAN weight, 0 = no discriminator")
    g.add_argument("--disc-start", type=int, help="step at which the discriminator switches on")
    g = p.add_argument_group("run")
    g.add_argument("--resume", default=None, help="checkpoint path, or 'auto' for OUT_DIR/latest.pt")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="cuda, cuda:1, mps, cpu (default: best available)")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="autocast precision; auto = bf16 on CUDA and on CPUs with native bf16 "
                        "(AMX/AVX512-BF16), fp32 elsewhere")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC convolution weights and inputs for the VQGAN and discriminator (default on: "
                        "1.26-1.5x faster f16-16384 GAN steps on a CPU, see VQGAN.channels_last)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the VQGAN's training forward (one-off compile time; measured no faster "
                        "on a CPU, see README Performance)")
    g.add_argument("--num-workers", type=int, default=1)
    g.add_argument("--log-every", type=int, default=50)
    g.add_argument("--val-every", type=int, default=500)
    g.add_argument("--save-every", type=int, default=500)
    g.add_argument("--keep-every", type=int, default=10_000, help="also keep step_N.pt every N steps (0 = off)")
    g.add_argument("--val-batches", type=int, default=0, help="limit validation batches (0 = all)")
    g.add_argument("--no-tensorboard", action="store_true")
    args = p.parse_args(argv)
    for k, v in TRAIN_DEFAULTS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.out_dir = args.out_dir or f"runs/vqgan-{args.preset}"
    return args


def model_config(args) -> VQGANConfig:
    over = {"n_codes": args.n_codes, "embed_dim": args.embed_dim, "l2_codes": args.l2_codes,
            "restart_threshold": args.restart_threshold}
    return replace(PRESETS[args.preset], **{k: v for k, v in over.items() if v is not None})


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float().clamp(-1, 1) + 1) / 2)


def compile_for_training(model):
    """torch.compile for train_vqgan's step. The adaptive GAN weight differentiates the loss twice
    (autograd.grad(..., retain_graph=True)), which compiled backwards with donated buffers refuse (found by
    tests/test_train_vqgan.py), so those are off."""
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    return torch.compile(model)


@torch.no_grad()
def validate(model: VQGAN, loader, env: D.DistEnv, autocast, lpips_model=None, max_batches: int = 0):
    """L1, PSNR (dB, per image, averaged), LPIPS, code usage and perplexity over this rank's share of the
    held-out set, summed over ranks."""
    was_training = model.training
    model.eval()
    usage = CodeUsage(model.cfg.n_codes)
    sums = torch.zeros(4, dtype=torch.float64, device=env.device)  # l1, psnr, lpips, n_images
    first = None
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        x = batch["image"].to(env.device, non_blocking=True)
        with autocast:
            x_rec, indices, _, _ = model(x)
        x_rec = x_rec.float().clamp(-1, 1)
        usage.update(indices)
        mse = (to_unit(x) - to_unit(x_rec)).pow(2).flatten(1).mean(1)
        sums[0] += (x - x_rec).abs().flatten(1).mean(1).sum().double()
        sums[1] += (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).sum().double()
        if lpips_model is not None:
            sums[2] += lpips_model(x, x_rec).sum().double()
        sums[3] += x.shape[0]
        if first is None:
            first = (x[:8].cpu(), x_rec[:8].cpu())
    D.all_reduce_sum(sums)
    usage.all_reduce()
    n = max(1.0, sums[3].item())
    metrics = {"val/l1": sums[0].item() / n, "val/psnr": sums[1].item() / n}
    if lpips_model is not None:
        metrics["val/lpips"] = sums[2].item() / n
    metrics.update({f"val/{k}": v for k, v in usage.summary().items()})
    model.train(was_training)
    return metrics, first


def save_grid(first, path: Path) -> torch.Tensor:
    """Inputs in the top row, their reconstructions below."""
    x, x_rec = first
    grid = make_grid(torch.cat([to_unit(x), to_unit(x_rec)]), nrow=x.shape[0], padding=2, pad_value=1.0)
    save_image(grid, path)
    return grid


def build_loaders(args, env, cfg, start_step):
    train_ds, val_ds = datasets.build_datasets(args, cfg.resolution, streaming=True)
    if isinstance(train_ds, torch.utils.data.IterableDataset):  # --stream
        train, sampler = data.stream_loader(train_ds, args.batch_size, env, start_step, args.num_workers)
    else:
        train, sampler = data.train_loader(train_ds, args.batch_size, env, args.seed, start_step, args.num_workers)
    return train, data.val_loader(val_ds, args.batch_size, env, args.num_workers), sampler


def checkpoint_state(raw, disc, ema, opt_g, opt_d, scaler, step, epoch, args, best, skipped, rngs):
    state = {"kind": "vqgan", "config": raw.cfg.to_dict(), "model": raw.state_dict(),
             "discriminator": disc.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
             "scaler": scaler.state_dict(), "step": step, "epoch": epoch, "best_psnr": best,
             "skipped_images": skipped, "rng": rngs, "train_args": vars(args)}
    if ema is not None:
        state["ema"], state["ema_updates"] = ema.state_dict(), ema.updates
    return state


def main(args) -> None:
    env = D.setup(args.device)
    D.seed_everything(args.seed, env.rank)
    out = Path(args.out_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    manager = ckpt.CheckpointManager(out)
    state = manager.load_resume(args.resume, "vqgan")
    cfg = VQGANConfig.from_dict(state["config"]) if state else model_config(args)

    loss_fn = VQLoss(args.pixel_loss, args.perceptual_weight, args.disc_weight, args.disc_start,
                     args.codebook_weight, args.lpips_vgg).to(env.device)
    raw = VQGAN(cfg).to(env.device).channels_last(args.channels_last)
    nhwc = raw.memory_format  # the discriminator and the batches follow the VQGAN's layout
    disc_raw = PatchDiscriminator().to(env.device, memory_format=nhwc)
    ema = EMA(raw, args.ema_decay) if args.ema_decay > 0 else None
    fused = D.fused_optimizer(env.device)
    opt_g = torch.optim.Adam(raw.parameters(), lr=args.lr, betas=(0.5, 0.9), fused=fused)
    opt_d = torch.optim.Adam(disc_raw.parameters(), lr=args.lr, betas=(0.5, 0.9), fused=fused)
    amp_dtype = D.autocast_dtype(args.precision, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=False)  # bf16 needs no loss scaling
    step, best, skipped = 0, -float("inf"), 0
    if state:
        raw.load_state_dict(state["model"])
        disc_raw.load_state_dict(state["discriminator"])
        ckpt.load_optimizer_state(opt_g, state["opt_g"])
        ckpt.load_optimizer_state(opt_d, state["opt_d"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"], state.get("ema_updates", state["step"]))
        step, best, skipped = state["step"], state["best_psnr"], state["skipped_images"]
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[env.rank] if len(rngs) == env.world_size else rngs[0])

    if args.batch_size % env.world_size:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by {env.world_size} processes")
    model = DDP(raw, broadcast_buffers=False) if env.distributed else raw
    disc = DDP(disc_raw, broadcast_buffers=False) if env.distributed else disc_raw
    if args.compile:  # training forward only: validation, EMA and checkpoints use the plain modules
        model = compile_for_training(model)
    train_loader, val_loader, sampler = build_loaders(args, env, cfg, step)
    lpips_val = loss_fn.perceptual
    if lpips_val is None and lpips_available(args.lpips_vgg):
        lpips_val = build_lpips(args.lpips_vgg).to(env.device)
    autocast = torch.autocast(env.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)

    log = Logger(out, env.is_main, args.max_steps, step, tensorboard=not args.no_tensorboard)
    n_params = sum(p.numel() for p in raw.parameters())
    log.print(f"vqgan {args.preset}: {n_params / 1e6:.1f}M params, {cfg.grid_size}x{cfg.grid_size} tokens, "
              f"{cfg.n_codes} codes | {env.world_size} process(es) on {env.device}"
              f"{' in bf16' if amp_dtype else ''} | "
              f"{'resuming at step ' + str(step) if step else 'from scratch'} | out {out}")
    stop = StopRequest()
    t_start, t_log, imgs_since_log = time.time(), time.time(), 0
    metrics: dict = {}
    data_iter = iter(train_loader)
    raw.train()
    while step < args.max_steps:
        batch = next(data_iter)
        x = batch["image"].to(env.device, non_blocking=True).contiguous(memory_format=nhwc)
        skipped += int(batch["skipped"].sum())
        lr = lr_at(step, args.lr, args.warmup_steps, args.max_steps, args.lr_schedule)
        set_lr((opt_g, opt_d), lr)

        with autocast:
            x_rec, _, qloss, qstats = model(x)
        gan = loss_fn.gan_active(step)
        disc_raw.requires_grad_(False)  # the generator's GAN term must not train the discriminator
        g_loss, logs = loss_fn.generator_loss(x, x_rec.float(), qloss, step, disc_raw if gan else None,
                                              raw.last_layer)
        disc_raw.requires_grad_(True)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        if args.grad_clip > 0:
            logs["grad_norm/g"] = torch.nn.utils.clip_grad_norm_(raw.parameters(), args.grad_clip)
        opt_g.step()
        if gan:
            with autocast:
                d_loss, d_logs = loss_fn.discriminator_loss(disc, x, x_rec.detach())
            opt_d.zero_grad(set_to_none=True)
            d_loss.float().backward()
            opt_d.step()
            logs.update(d_logs)
        if ema is not None:
            ema.update(raw)
        step += 1
        imgs_since_log += x.shape[0] * env.world_size
        log.advance(1, {"loss": logs["loss/total"], "ppl": qstats["perplexity"]})

        if step % args.log_every == 0 or step == args.max_steps:
            dt = time.time() - t_log
            logs.update({"lr": lr, "perf/images_per_s": imgs_since_log / max(dt, 1e-9),
                         "train/perplexity": qstats["perplexity"], "train/batch_usage": qstats["batch_usage"],
                         "data/skipped_images": skipped})
            log.scalars(logs, step)
            log.print(f"step {step}/{args.max_steps} loss {float(logs['loss/total']):.4f} "
                      f"pixel {float(logs['loss/pixel']):.4f} ppl {float(qstats['perplexity']):.1f} "
                      f"{imgs_since_log / max(dt, 1e-9):.1f} img/s")
            t_log, imgs_since_log = time.time(), 0

        is_best = False
        if step % args.val_every == 0 or step == args.max_steps:
            eval_model = ema.model if ema is not None else raw
            metrics, first = validate(eval_model, val_loader, env, autocast, lpips_val, args.val_batches)
            log.scalars(metrics, step)
            log.print("val " + " ".join(f"{k[4:]} {v:.4f}" for k, v in metrics.items()))
            if env.is_main and first is not None:
                log.image("reconstruction (top: input)", save_grid(first, out / "recon.png"), step)
            is_best = metrics["val/psnr"] > best
            best = max(best, metrics["val/psnr"])

        stopping = D.any_rank(stop.requested, env.device)
        if stopping or is_best or step % args.save_every == 0 or step == args.max_steps:
            rngs = ckpt.gather_rng_states()
            if env.is_main:
                periodic = args.keep_every > 0 and step % args.keep_every == 0
                manager.save(checkpoint_state(raw, disc_raw, ema, opt_g, opt_d, scaler, step,
                                              sampler.epoch_of(step), args, best, skipped, rngs),
                             step, periodic=periodic, best=is_best)
            D.barrier()
        if stopping:
            log.print(f"received {stop.name or 'a stop signal'}: saved {manager.latest} at step {step}; "
                      f"continue with --resume auto")
            break

    elapsed = time.time() - t_start
    if metrics and env.is_main:
        log.print(f"done: step {step}, {elapsed / 60:.1f} min, val PSNR {metrics['val/psnr']:.2f} dB, "
                  f"L1 {metrics['val/l1']:.4f}, code usage {metrics['val/usage']:.1%}, "
                  f"perplexity {metrics['val/perplexity']:.1f}, skipped images {skipped}, "
                  f"checkpoints in {out}")
    log.close()
    stop.restore()
    D.cleanup()


if __name__ == "__main__":
    run(main, parse_args())
