"""The Shapes world's small CLIP: the stand-in for a CLIP pretrained elsewhere on image-caption pairs.

    python train_clip.py                                   # one process, best device found
    torchrun --nproc_per_node 2 train_clip.py --batch-size 256

A small open_clip model trained contrastively (symmetric InfoNCE, learnable temperature) on the captioned
Shapes split. Validation is zero-shot: how often CLIP names the colour, shape, size and grid cell of
held-out images; best.pt keeps the weights whose worst attribute is best. Load the result anywhere with
models.clip.load_clip("runs/clip-shapes/best.pt").
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import time
from pathlib import Path

import torch
from open_clip.loss import ClipLoss
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP

from datasets import ShapesDataset
from engine import checkpoint as ckpt
from engine import data
from engine import distributed as D
from engine.cli import UsageError, run
from engine.ema import EMA
from engine.logs import Logger
from engine.schedule import lr_at, set_lr
from engine.signals import StopRequest
from models.clip import (CLIP, DEFAULT_PREPROCESS, PROMPT_STYLES, ZERO_SHOT_ATTRIBUTES, accuracies, build_open_clip,
                         to_clip_pixels, tokenize, tokenizer_for, zero_shot_counts)

# Pixel normalisation of the Shapes CLIP: white (the background) -> 0, black -> -2. A ViT's pooled output
# starts out as an average over patch tokens, in which the patches' position embeddings cancel; with a
# zero background, a background token is its position embedding alone, so the object, by replacing the
# tokens it covers, moves the average by their positions. With OpenAI's mean/std (white -> ~2) the ViT did
# not learn where the object is: still at chance after 300 steps trained on the position labels directly,
# where white -> 0 learns them in 50. Contrastively, position needs this AND captions that name it often
# (datasets.shapes.P_POSITION = 0.8): either alone left zero-shot position at chance after 650-730 steps
# (colour, shape, size ~100%); both together name the grid cell >= 96% right by step 300.
WHITE_ZERO = {"mean": (1.0, 1.0, 1.0), "std": (0.5, 0.5, 0.5)}

# A preset is what a checkpoint stores: an open_clip model config (the format of open_clip's
# model_configs/*.json) and the pixel normalisation.
PRESETS = {
    # A ViT on 64 px images with 16 px patches (4 x 4 tokens + CLS) and a text transformer over captions of
    # at most 32 BPE tokens; two blocks each. On 2 busy CPU cores (0.27 s a step) it named every attribute
    # of held-out images >= 95% right by step 300 and >= 99% from step 400 on; a 4-block, 192-wide model was
    # 2x slower a step and no better per step.
    "shapes": {
        "open_clip_config": {
            "embed_dim": 64,
            "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 128, "layers": 2, "head_width": 32},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
        },
        "preprocess": WHITE_ZERO,
    },
    # For tests: one block per tower on 32 px images (the 64 px Shapes images are resized by CLIP's own
    # preprocessing, as any image of another size would be).
    "tiny": {
        "open_clip_config": {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 32},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
        },
        "preprocess": WHITE_ZERO,
    },
}
TRAIN_DEFAULTS = {
    "shapes": dict(batch_size=128, lr=2e-3, max_steps=1000, warmup_steps=50),
    "tiny": dict(batch_size=8, lr=1e-3, max_steps=20, warmup_steps=2),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="shapes", help="model size and defaults")
    p.add_argument("--out-dir", default=None, help="checkpoints and logs (default runs/clip-PRESET)")
    g = p.add_argument_group("data (the Shapes world's captioned splits)")
    g.add_argument("--shapes-train-size", type=int, default=50_000, help="items per training epoch")
    g.add_argument("--shapes-val-size", type=int, default=1_000, help="held-out items for zero-shot accuracy")
    g.add_argument("--zero-shot-prompts", choices=PROMPT_STYLES, default="ensemble",
                   help="prompts whose accuracies pick best.pt (both are logged); see models.clip.attribute_prompts")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, help="global batch, split over processes; the contrastive loss "
                                                  "sees all of it")
    g.add_argument("--lr", type=float)
    g.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine")
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--max-steps", type=int)
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW, on matrices only")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 = off")
    g.add_argument("--ema-decay", type=float, default=0.0, help="keep an EMA of the weights (0 = off)")
    g = p.add_argument_group("run")
    g.add_argument("--resume", default=None, help="checkpoint path, or 'auto' for OUT_DIR/latest.pt")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="cuda, cuda:1, mps, cpu (default: best available)")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="autocast precision; auto = bf16 on CUDA and on CPUs with native bf16 "
                        "(AMX/AVX512-BF16), fp32 elsewhere")
    g.add_argument("--num-workers", type=int, default=1)
    g.add_argument("--log-every", type=int, default=50)
    g.add_argument("--val-every", type=int, default=250)
    g.add_argument("--save-every", type=int, default=250)
    g.add_argument("--keep-every", type=int, default=10_000, help="also keep step_N.pt every N steps (0 = off)")
    g.add_argument("--no-tensorboard", action="store_true")
    args = p.parse_args(argv)
    for k, v in TRAIN_DEFAULTS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.out_dir = args.out_dir or f"runs/clip-{args.preset}"
    return args


def build_optimizer(model: torch.nn.Module, args) -> torch.optim.AdamW:
    """AdamW as CLIP trains: weight decay on weight matrices and embeddings, none on gains, biases and
    the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = D.fused_optimizer(next(model.parameters()).device)
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6, fused=fused)


def attention_backend(device: torch.device):
    """On CPUs plain matmul attention: the fused (flash) kernel's bf16 backward is slow for these short
    sequences (17 and 32 tokens); forward + backward of the shapes preset at batch 128: 0.17 s vs 0.28 s."""
    return sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else contextlib.nullcontext()


@torch.no_grad()
def validate(model: torch.nn.Module, config: dict, preprocess: dict, val_ds, env: D.DistEnv) -> dict:
    """Zero-shot accuracy per attribute and prompt style on the held-out split; each rank scores its
    share (items r, r + W, ...) and the counts are summed. The model is scored through a frozen copy in
    the same wrapper every later stage uses."""
    clip = CLIP(copy.deepcopy(model), tokenizer_for(config), preprocess["mean"], preprocess["std"])
    counts = zero_shot_counts(clip, val_ds, range(env.rank, len(val_ds), env.world_size))
    metrics = {}
    for style, c in counts.items():
        acc = accuracies(D.all_reduce_sum(c.to(env.device)).cpu())
        metrics.update({f"val/{style}/{a}": v for a, v in acc.items()})
        metrics[f"val/{style}/min"] = min(acc.values())
    return metrics


def checkpoint_state(raw, ema, opt, config, preprocess, step, epoch, args, best, metrics, rngs) -> dict:
    state = {"kind": "clip", "open_clip_config": config, "preprocess": preprocess,
             "model": raw.state_dict(), "optimizer": opt.state_dict(), "step": step, "epoch": epoch,
             "best_min_accuracy": best, "metrics": metrics, "rng": rngs, "train_args": vars(args)}
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
    state = manager.load_resume(args.resume, "clip")
    if args.batch_size % env.world_size:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by {env.world_size} processes")
    preset = state or copy.deepcopy(PRESETS[args.preset])
    config, preprocess = preset["open_clip_config"], preset.get("preprocess", DEFAULT_PREPROCESS)

    raw = build_open_clip(config).to(env.device)
    ema = EMA(raw, args.ema_decay) if args.ema_decay > 0 else None
    opt = build_optimizer(raw, args)
    step, best, metrics = 0, -1.0, {}
    if state:
        raw.load_state_dict(state["model"])
        ckpt.load_optimizer_state(opt, state["optimizer"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"], state.get("ema_updates", state["step"]))
        step, best, metrics = state["step"], state["best_min_accuracy"], state["metrics"]
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[env.rank] if len(rngs) == env.world_size else rngs[0])

    model = DDP(raw, broadcast_buffers=False) if env.distributed else raw
    # Every rank's features join one (global batch x global batch) logit matrix; gathering with gradients
    # makes N processes compute the gradient one process would on the whole batch.
    loss_fn = ClipLoss(local_loss=False, gather_with_grad=True, rank=env.rank, world_size=env.world_size)
    train_loader, sampler = data.train_loader(ShapesDataset("captioned-train", args.shapes_train_size),
                                              args.batch_size, env, args.seed, step, args.num_workers)
    val_ds = ShapesDataset("captioned-val", args.shapes_val_size)
    tokenizer = tokenizer_for(config)
    image_size = raw.visual.image_size
    image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    context_length = config["text_cfg"]["context_length"]
    mean = torch.tensor(preprocess["mean"], device=env.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess["std"], device=env.device).view(1, 3, 1, 1)
    amp_dtype = D.autocast_dtype(args.precision, env.device)
    autocast = torch.autocast(env.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)

    log = Logger(out, env.is_main, args.max_steps, step, tensorboard=not args.no_tensorboard)
    n_params = sum(p.numel() for p in raw.parameters())
    log.print(f"clip {args.preset}: {n_params / 1e6:.1f}M params, {image_size[0]} px images, "
              f"{context_length}-token text, embed {config['embed_dim']} | {env.world_size} process(es) on "
              f"{env.device}{' in bf16' if amp_dtype else ''} | "
              f"{'resuming at step ' + str(step) if step else 'from scratch'} | out {out}")
    stop = StopRequest()
    t_start, t_log, imgs_since_log = time.time(), time.time(), 0
    data_iter = iter(train_loader)
    raw.train()
    while step < args.max_steps:
        batch = next(data_iter)
        pixels = to_clip_pixels(batch["image"].to(env.device, non_blocking=True), image_size, mean, std)
        tokens, _ = tokenize(tokenizer, batch["caption"], context_length)
        lr = lr_at(step, args.lr, args.warmup_steps, args.max_steps, args.lr_schedule)
        set_lr((opt,), lr)

        with autocast, attention_backend(env.device):
            img_f, txt_f, scale = model(pixels, tokens.to(env.device))  # (B, D), (B, D) unit norm, ()
        loss = loss_fn(img_f.float(), txt_f.float(), scale.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), args.grad_clip or float("inf"))
        opt.step()
        with torch.no_grad():
            raw.logit_scale.clamp_(0, math.log(100))  # temperature at most 100, as in CLIP
        if ema is not None:
            ema.update(raw)
        step += 1
        imgs_since_log += pixels.shape[0] * env.world_size
        log.advance(1, {"loss": loss.item()})

        if step % args.log_every == 0 or step == args.max_steps:
            dt = time.time() - t_log
            with torch.no_grad():  # this rank's share: image -> caption retrieval within its batch
                batch_acc = ((img_f.float() @ txt_f.float().T).argmax(-1) ==
                             torch.arange(len(img_f), device=img_f.device)).float().mean().item()
            log.scalars({"loss": loss.item(), "logit_scale": scale.item(), "lr": lr, "grad_norm": grad_norm,
                         "train/batch_i2t_acc": batch_acc,
                         "perf/images_per_s": imgs_since_log / max(dt, 1e-9)}, step)
            log.print(f"step {step}/{args.max_steps} loss {loss.item():.4f} scale {scale.item():.1f} "
                      f"batch-acc {batch_acc:.3f} {imgs_since_log / max(dt, 1e-9):.1f} img/s")
            t_log, imgs_since_log = time.time(), 0

        is_best = False
        if step % args.val_every == 0 or step == args.max_steps:
            metrics = validate(ema.model if ema is not None else raw, config, preprocess, val_ds, env)
            log.scalars(metrics, step)
            for style in PROMPT_STYLES:
                log.print(f"val {style}: " + " ".join(f"{a} {metrics[f'val/{style}/{a}']:.3f}"
                                                     for a in ZERO_SHOT_ATTRIBUTES))
            score = metrics[f"val/{args.zero_shot_prompts}/min"]
            is_best = score > best
            best = max(best, score)

        stopping = D.any_rank(stop.requested, env.device)
        if stopping or is_best or step % args.save_every == 0 or step == args.max_steps:
            rngs = ckpt.gather_rng_states()
            if env.is_main:
                periodic = args.keep_every > 0 and step % args.keep_every == 0
                manager.save(checkpoint_state(raw, ema, opt, config, preprocess, step, sampler.epoch_of(step), args,
                                              best, metrics, rngs), step, periodic=periodic, best=is_best)
            D.barrier()
        if stopping:
            log.print(f"received {stop.name or 'a stop signal'}: saved {manager.latest} at step {step}; "
                      f"continue with --resume auto")
            break

    elapsed = time.time() - t_start
    if metrics and env.is_main:
        style = args.zero_shot_prompts
        log.print(f"done: step {step}, {elapsed / 60:.1f} min, zero-shot ({style} prompts) "
                  + ", ".join(f"{a} {metrics[f'val/{style}/{a}']:.1%}" for a in ZERO_SHOT_ATTRIBUTES)
                  + f", best min {best:.1%}, checkpoints in {out}")
    log.close()
    stop.restore()
    D.cleanup()


if __name__ == "__main__":
    run(main, parse_args())
