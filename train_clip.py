"""The Shapes world's small CLIP: the stand-in for a CLIP pretrained elsewhere on image-caption pairs.

    python train_clip.py                                   # one process, best device found
    torchrun --nproc_per_node 2 train_clip.py --batch-size 256

A small open_clip model trained contrastively (symmetric InfoNCE, learnable temperature) on the captioned
Shapes split (--dataset scenes: the scenes world's). Validation is zero-shot: how often CLIP names the
colour, shape, size and grid cell of held-out images (scenes: the held-out scene among all the split's
scene descriptions, per object count; evaluation/scenes_zero_shot.py); best.pt keeps the weights whose
worst attribute (object count) is best. Load the result anywhere with
models.clip.load_clip("runs/clip-shapes/best.pt").
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math

import torch
from open_clip.loss import ClipLoss
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP

from datasets import SYNTHETIC, ScenesDataset
from engine import distributed as D
from engine.cli import add_run_args, apply_defaults, run
from engine.schedule import lr_at, set_lr
from engine.trainer import Run
from evaluation.scenes_zero_shot import SCENE_COUNTS, scene_accuracies, scene_zero_shot_counts
from evaluation.zero_shot import PROMPT_STYLES, ZERO_SHOT_ATTRIBUTES, accuracies, zero_shot_counts
from models.clip import CLIP, DEFAULT_PREPROCESS, build_open_clip, to_clip_pixels, tokenize, tokenizer_for

# Pixel normalisation of the Shapes CLIP: white (the background) -> 0, black -> -2. A ViT's pooled output
# starts out as an average over patch tokens, in which the patches' position embeddings cancel; with a
# zero background, a background token is its position embedding alone, so the object, by replacing the
# tokens it covers, moves the average by their positions. With OpenAI's mean/std (white -> ~2) the ViT did
# not learn where the object is: still at chance after 300 steps trained on the position labels directly,
# where white -> 0 learns them in 50. Contrastively, position needs this AND captions that name it often
# (datasets.shapes.P_POSITION = 0.8): either alone left zero-shot position at chance after 650-730 steps
# (colour, shape, size ~100%); both together name the grid cell >= 96% right by step 300.
WHITE_ZERO = {"mean": (1.0, 1.0, 1.0), "std": (0.5, 0.5, 0.5)}

def _shapes_clip(embed_dim: int, image_size: int, patch_size: int, width: int, layers: int, text_heads: int) -> dict:
    """A preset: what a checkpoint stores, an open_clip model config (the format of open_clip's
    model_configs/*.json) and the pixel normalisation. Both towers `width` wide and `layers` deep, 32-wide
    vision heads, captions of at most 32 BPE tokens."""
    return {"open_clip_config": {
                "embed_dim": embed_dim,
                "vision_cfg": {"image_size": image_size, "patch_size": patch_size, "width": width, "layers": layers,
                               "head_width": 32},
                "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": width, "heads": text_heads,
                             "layers": layers}},
            "preprocess": WHITE_ZERO}


PRESETS = {
    # A ViT on 64 px images with 16 px patches (4 x 4 tokens + CLS) and a text transformer over captions of
    # at most 32 BPE tokens; two blocks each. On 2 busy CPU cores (0.27 s a step) it named every attribute
    # of held-out images >= 95% right by step 300 and >= 99% from step 400 on; a 4-block, 192-wide model was
    # 2x slower a step and no better per step.
    "shapes": _shapes_clip(embed_dim=64, image_size=64, patch_size=16, width=128, layers=2, text_heads=4),
    # For tests: one block per tower on 32 px images (the 64 px Shapes images are resized by CLIP's own
    # preprocessing, as any image of another size would be).
    "tiny": _shapes_clip(embed_dim=32, image_size=32, patch_size=8, width=64, layers=1, text_heads=2),
}
TRAIN_DEFAULTS = {
    "shapes": dict(batch_size=128, lr=2e-3, max_steps=1000, warmup_steps=50),
    "tiny": dict(batch_size=8, lr=1e-3, max_steps=20, warmup_steps=2),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="shapes", help="model size and defaults")
    p.add_argument("--out-dir", default=None, help="checkpoints and logs (default runs/clip-PRESET)")
    g = p.add_argument_group("data (a synthetic world's captioned splits)")
    g.add_argument("--dataset", choices=sorted(SYNTHETIC), default="shapes",
                   help="shapes (one object) or scenes (1-4 objects: counts, colour binding, relations)")
    g.add_argument("--shapes-train-size", type=int, default=50_000, help="items per training epoch (either world)")
    g.add_argument("--shapes-val-size", type=int, default=1_000, help="held-out items for zero-shot accuracy")
    g.add_argument("--zero-shot-prompts", choices=PROMPT_STYLES, default="ensemble",
                   help="prompts whose accuracies pick best.pt (both are logged); see evaluation.zero_shot.attribute_prompts")
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
    add_run_args(p, val_every=250, save_every=250)
    args = p.parse_args(argv)
    apply_defaults(args, TRAIN_DEFAULTS[args.preset])
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
    share = range(env.rank, len(val_ds), env.world_size)
    if isinstance(val_ds, ScenesDataset):  # name each held-out scene among the split's scenes
        acc = scene_accuracies(D.all_reduce_sum(scene_zero_shot_counts(clip, val_ds, share).to(env.device)).cpu())
        return {**{f"val/scenes/{k}": v for k, v in acc.items()},
                "val/scenes/min": min(acc[k] for k in SCENE_COUNTS)}
    counts = zero_shot_counts(clip, val_ds, share)
    metrics = {}
    for style, c in counts.items():
        acc = accuracies(D.all_reduce_sum(c.to(env.device)).cpu())
        metrics.update({f"val/{style}/{a}": v for a, v in acc.items()})
        metrics[f"val/{style}/min"] = min(acc.values())
    return metrics


def main(args) -> None:
    run = Run(args, "clip", best_key="best_min_accuracy", best_start=-1.0)
    env, precision = run.env, run.precision
    preset = run.state or copy.deepcopy(PRESETS[args.preset])
    config, preprocess = preset["open_clip_config"], preset.get("preprocess", DEFAULT_PREPROCESS)

    raw = build_open_clip(config).to(env.device)
    opt = build_optimizer(raw, args)
    ema = run.restore_weights({"model": raw}, args.ema_decay)
    run.restore_training({"optimizer": opt})
    metrics = run.resumed("metrics", {})

    model = DDP(raw, broadcast_buffers=False) if env.distributed else raw
    # Every rank's features join one (global batch x global batch) logit matrix; gathering with gradients
    # makes N processes compute the gradient one process would on the whole batch.
    loss_fn = ClipLoss(local_loss=False, gather_with_grad=True, rank=env.rank, world_size=env.world_size)
    world = SYNTHETIC[args.dataset]
    train_loader = run.train_loader(world("captioned-train", args.shapes_train_size))
    val_ds = world("captioned-val", args.shapes_val_size)
    # What picks best.pt and what is printed: per prompt style the Shapes attributes, or per object count.
    report = ({"scenes": [*SCENE_COUNTS, "all"]} if args.dataset == "scenes" else
              {style: ZERO_SHOT_ATTRIBUTES for style in PROMPT_STYLES})
    best_key = "val/scenes/min" if args.dataset == "scenes" else f"val/{args.zero_shot_prompts}/min"
    tokenizer = tokenizer_for(config)
    image_size = raw.visual.image_size
    image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    context_length = config["text_cfg"]["context_length"]
    mean = torch.tensor(preprocess["mean"], device=env.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess["std"], device=env.device).view(1, 3, 1, 1)

    run.start(f"clip {args.preset}: {sum(p.numel() for p in raw.parameters()) / 1e6:.1f}M params, {image_size[0]} px "
              f"images, {context_length}-token text, embed {config['embed_dim']}")
    raw.train()
    for batch in run.batches(train_loader):
        pixels = to_clip_pixels(batch["image"].to(env.device, non_blocking=True), image_size, mean, std)
        tokens, _ = tokenize(tokenizer, batch["caption"], context_length)
        lr = lr_at(run.step, args.lr, args.warmup_steps, args.max_steps, args.lr_schedule)
        set_lr((opt,), lr)

        with precision.autocast, attention_backend(env.device):
            img_f, txt_f, scale = model(pixels, tokens.to(env.device))  # (B, D), (B, D) unit norm, ()
        loss = loss_fn(img_f.float(), txt_f.float(), scale.float())
        grad_norm = precision.step(loss, opt, raw.parameters(), args.grad_clip or float("inf"))
        precision.update()
        with torch.no_grad():
            raw.logit_scale.clamp_(0, math.log(100))  # temperature at most 100, as in CLIP
        if ema is not None:
            ema.update(raw)
        run.advance(pixels.shape[0], {"loss": loss.item()})

        if run.due(args.log_every):
            rate = run.throughput()
            with torch.no_grad():  # this rank's share: image -> caption retrieval within its batch
                batch_acc = ((img_f.float() @ txt_f.float().T).argmax(-1) ==
                             torch.arange(len(img_f), device=img_f.device)).float().mean().item()
            run.log.scalars({"loss": loss.item(), "logit_scale": scale.item(), "lr": lr, "grad_norm": grad_norm,
                             "train/batch_i2t_acc": batch_acc, "perf/images_per_s": rate, **precision.scalars()},
                            run.step)
            run.log.print(f"step {run.step}/{args.max_steps} loss {loss.item():.4f} scale {scale.item():.1f} "
                          f"batch-acc {batch_acc:.3f} {rate:.1f} img/s")

        is_best = False
        if run.due(args.val_every):
            metrics = validate(ema.model if ema is not None else raw, config, preprocess, val_ds, env)
            run.log.scalars(metrics, run.step)
            for style, keys in report.items():
                run.log.print(f"val {style}: " + " ".join(f"{a} {metrics[f'val/{style}/{a}']:.3f}" for a in keys))
            is_best = run.improved(metrics[best_key])
        run.checkpoint(is_best, lambda: {"open_clip_config": config, "preprocess": preprocess, "model": raw.state_dict(),
                                         "optimizer": opt.state_dict(), "metrics": metrics})

    style = "scenes" if args.dataset == "scenes" else args.zero_shot_prompts
    what = "scenes named, by object count:" if style == "scenes" else f"({style} prompts)"
    run.finish(metrics and f"zero-shot {what} " + ", ".join(
        f"{a} {metrics[f'val/{style}/{a}']:.1%}" for a in report[style]) + f", best min {run.best:.1%}")


if __name__ == "__main__":
    run(main, parse_args())
