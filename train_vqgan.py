"""Stage 1: train the VQGAN image tokenizer.

    python train_vqgan.py --preset shapes                      # one process, best device found
    torchrun --nproc_per_node 4 train_vqgan.py --preset f16-16384 --dataset folder --data-path imgs/

Images -> encoder -> nearest codebook entries (a grid of integer tokens) -> decoder -> images, trained
with pixel + perceptual + codebook losses and, from --disc-start on, a PatchGAN. The GPT of stage 2
learns to write these token grids.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.utils import make_grid, save_image

import datasets
from engine import distributed as D
from engine.checkpoint import atomic_write
from engine.cli import (Parser, UsageError, add_run_args, apply_defaults, at_least, fraction, non_negative_float,
                        run)
from engine.schedule import lr_at, set_lr
from engine.trainer import RankCount, Run
from models.convert import load_vqgan
from models.discriminator import PatchDiscriminator
from models.losses import VQLoss, build_lpips, lpips_available
from models.quantizer import CodeUsage
from models.vqgan import PRESETS, VQGAN, VQGANConfig

# Training defaults per preset; a flag given on the command line wins.
TRAIN_DEFAULTS = {
    "shapes": dict(batch_size=16, lr=4e-4, max_steps=3000, perceptual_weight=0.0, pixel_loss="l1+l2",
                   disc_weight=0.1, disc_start=2000, warmup_steps=100, lr_schedule="cosine"),
    "scenes": dict(batch_size=16, lr=4e-4, max_steps=3000, perceptual_weight=0.0, pixel_loss="l1+l2",
                   disc_weight=0.1, disc_start=2000, warmup_steps=100, lr_schedule="cosine"),
    "f16-16384": dict(batch_size=16, lr=1e-4, max_steps=500_000, perceptual_weight=1.0, pixel_loss="l1",
                      disc_weight=0.8, disc_start=50_000, warmup_steps=1000, lr_schedule="constant"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="shapes", help="model size and defaults")
    p.add_argument("--out-dir", default=None, help="checkpoints, logs, grids (default runs/vqgan-PRESET)")
    datasets.add_data_args(p)
    g = p.add_argument_group("model (overrides of the preset)")
    g.add_argument("--n-codes", type=at_least(1))
    g.add_argument("--embed-dim", type=at_least(1), help="code vector width")
    g.add_argument("--l2-codes", action=argparse.BooleanOptionalAction, default=None,
                   help="l2-normalised code lookup")
    g.add_argument("--restart-threshold", type=non_negative_float, help="re-seed codes used less than this per batch")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=at_least(1), help="global batch, split over processes")
    g.add_argument("--lr", type=non_negative_float)
    g.add_argument("--lr-schedule", choices=["constant", "cosine"])
    g.add_argument("--warmup-steps", type=at_least(0))
    g.add_argument("--max-steps", type=at_least(1))
    g.add_argument("--grad-clip", type=non_negative_float, default=1.0, help="max gradient norm, 0 = off")
    g.add_argument("--ema-decay", type=fraction, default=0.0, help="keep an EMA of the weights (0 = off)")
    g = p.add_argument_group("losses")
    g.add_argument("--pixel-loss", choices=["l1", "l2", "l1+l2"])
    g.add_argument("--perceptual-weight", type=non_negative_float, help="LPIPS weight (needs VGG16 weights)")
    g.add_argument("--lpips-vgg", default=None, help="path to torchvision's vgg16-397923af.pth")
    g.add_argument("--codebook-weight", type=non_negative_float, default=1.0)
    g.add_argument("--disc-weight", type=non_negative_float, help="GAN weight, 0 = no discriminator")
    g.add_argument("--disc-start", type=at_least(0), help="step at which the discriminator switches on")
    g = add_run_args(p, val_every=500, save_every=500,
                     init_from="a train_vqgan.py checkpoint, an exported .safetensors, a CLIP-GEN vqgan_*.pt or a "
                               "taming-transformers .ckpt (--n-codes, --embed-dim, --l2-codes cannot change it; "
                               "--restart-threshold can; the discriminator starts afresh)",
                     compiles="the VQGAN's training forward", val_batches=True)
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC convolution weights and inputs for the VQGAN and discriminator (default on: "
                        "1.26-1.5x faster f16-16384 GAN steps on a CPU, see VQGAN.channels_last)")
    args = p.parse_args(argv)
    apply_defaults(args, TRAIN_DEFAULTS[args.preset])
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
    atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))  # a full disk: one line, no half file
    return grid


def build_model(args, run) -> VQGAN:
    """The VQGAN to train: a resumed run's config (its weights follow), the --init-from file's model (weights
    and config), or a fresh one from the preset and the flags."""
    if run.state:
        return VQGAN(VQGANConfig.from_dict(run.state["config"]))
    if not run.init_from:
        return VQGAN(model_config(args))
    fixed = [f for f in ("n_codes", "embed_dim", "l2_codes") if getattr(args, f) is not None]
    if fixed:
        raise UsageError(f"--init-from {run.init_from} fixes the model config; drop --{fixed[0].replace('_', '-')}")
    model = load_vqgan(run.init_from)
    if args.restart_threshold is not None and args.restart_threshold != model.cfg.restart_threshold:
        tuned = VQGAN(replace(model.cfg, restart_threshold=args.restart_threshold))  # the quantizer reads it once
        tuned.load_state_dict(model.state_dict())
        model = tuned
    return model


def main(args) -> None:
    run = Run(args, "vqgan", best_key="best_psnr")
    env = run.env
    loss_fn = VQLoss(args.pixel_loss, args.perceptual_weight, args.disc_weight, args.disc_start,
                     args.codebook_weight, args.lpips_vgg).to(env.device)
    raw = build_model(args, run).to(env.device).channels_last(args.channels_last)
    cfg, nhwc = raw.cfg, raw.memory_format  # the discriminator and the batches follow the VQGAN's layout
    disc_raw = PatchDiscriminator().to(env.device, memory_format=nhwc)
    ema = run.restore_weights({"model": raw, "discriminator": disc_raw}, args.ema_decay)
    fused = D.fused_optimizer(env.device)
    opt_g = torch.optim.Adam(raw.parameters(), lr=args.lr, betas=(0.5, 0.9), fused=fused)
    opt_d = torch.optim.Adam(disc_raw.parameters(), lr=args.lr, betas=(0.5, 0.9), fused=fused)
    run.restore_training({"opt_g": opt_g, "opt_d": opt_d})
    skipped = RankCount(run.resumed("skipped_images", 0))  # corrupt images each rank skipped, summed over ranks

    model = DDP(raw, broadcast_buffers=False) if env.distributed else raw
    disc = DDP(disc_raw, broadcast_buffers=False) if env.distributed else disc_raw
    if args.compile:  # training forward only: validation, EMA and checkpoints use the plain modules
        model = compile_for_training(model)
    train_ds, val_ds = datasets.build_datasets(args, cfg.resolution, streaming=True)
    train_loader, val_loader = run.train_loader(train_ds), run.val_loader(val_ds)
    lpips_val = loss_fn.perceptual
    if lpips_val is None and lpips_available(args.lpips_vgg):
        lpips_val = build_lpips(args.lpips_vgg).to(env.device)
    autocast, precision = run.precision.autocast, run.precision

    run.start(f"vqgan {args.preset}: {sum(p.numel() for p in raw.parameters()) / 1e6:.1f}M params, "
              f"{cfg.grid_size}x{cfg.grid_size} tokens, {cfg.n_codes} codes")
    metrics: dict = {}
    raw.train()
    for batch in run.batches(train_loader):
        x = batch["image"].to(env.device, non_blocking=True).contiguous(memory_format=nhwc)
        skipped.add(batch["skipped"].sum())
        lr = lr_at(run.step, args.lr, args.warmup_steps, args.max_steps, args.lr_schedule)
        set_lr((opt_g, opt_d), lr)

        with autocast:
            x_rec, _, qloss, qstats = model(x)
        gan = loss_fn.gan_active(run.step)
        disc_raw.requires_grad_(False)  # the generator's GAN term must not train the discriminator
        g_loss, logs = loss_fn.generator_loss(x, x_rec.float(), qloss, run.step, disc_raw if gan else None,
                                              raw.last_layer)
        disc_raw.requires_grad_(True)
        norm = precision.step(g_loss, opt_g, raw.parameters(), args.grad_clip if args.grad_clip > 0 else None)
        if norm is not None:
            logs["grad_norm/g"] = norm
        if gan:
            with autocast:
                d_loss, d_logs = loss_fn.discriminator_loss(disc, x, x_rec.detach())
            precision.step(d_loss.float(), opt_d)
            logs.update(d_logs)
        precision.update()  # one loss scale for both optimizers, updated once a step
        if ema is not None:
            ema.update(raw)
        run.advance(x.shape[0], {"loss": logs["loss/total"], "ppl": qstats["perplexity"]})

        if run.due(args.log_every):
            rate = run.throughput()
            logs.update({"lr": lr, "perf/images_per_s": rate, "train/perplexity": qstats["perplexity"],
                         "train/batch_usage": qstats["batch_usage"], "data/skipped_images": skipped.total(env.device),
                         **precision.scalars()})
            run.log.scalars(logs, run.step)
            run.log.print(f"step {run.step}/{args.max_steps} loss {float(logs['loss/total']):.4f} "
                          f"pixel {float(logs['loss/pixel']):.4f} ppl {float(qstats['perplexity']):.1f} "
                          f"{rate:.1f} img/s")

        is_best = False
        if run.due(args.val_every):
            metrics, first = validate(ema.model if ema is not None else raw, val_loader, env, autocast, lpips_val,
                                      args.val_batches)
            run.log.scalars(metrics, run.step)
            run.log.print("val " + " ".join(f"{k[4:]} {v:.4f}" for k, v in metrics.items()))
            if env.is_main and first is not None:
                run.log.image("reconstruction (top: input)", save_grid(first, run.out / "recon.png"), run.step)
            is_best = run.improved(metrics["val/psnr"])
        run.checkpoint(is_best, lambda: {"config": cfg.to_dict(), "model": raw.state_dict(),
                                         "discriminator": disc_raw.state_dict(), "opt_g": opt_g.state_dict(),
                                         "opt_d": opt_d.state_dict(), "skipped_images": skipped.total(env.device)})

    n_skipped = skipped.total(env.device)  # a collective: before the rank-0-only summary
    run.finish(metrics and f"val PSNR {metrics['val/psnr']:.2f} dB, L1 {metrics['val/l1']:.4f}, code usage "
                           f"{metrics['val/usage']:.1%}, perplexity {metrics['val/perplexity']:.1f}, "
                           f"skipped images {n_skipped}")


if __name__ == "__main__":
    run(main, parse_args())
