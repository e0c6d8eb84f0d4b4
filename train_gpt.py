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
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.utils import make_grid, save_image

import datasets
from datasets.encoded import EncodedShards, check_models
from engine import checkpoint as ckpt
from engine import distributed as D
from engine import fsdp as FS
from engine.cli import (Parser, UsageError, add_run_args, at_least, fraction, non_negative_float,
                        run)
from engine.schedule import lr_at, set_lr
from engine.trainer import NonFiniteGuard, Run
from models.clip import load_clip
from models.convert import load_vqgan
from models.convert_gpt import load_gpt, project_config
from models.gpt import GPT, PRESETS, build_gpt

DEFAULT_PROMPTS = ["a red circle in the top left", "a blue square at the bottom", "a large green triangle",
                   "a small yellow diamond on the right"]


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vqgan", required=True, help="frozen VQGAN checkpoint (ours, CLIP-GEN or taming)")
    p.add_argument("--clip", required=True, help="frozen CLIP: checkpoint path or open_clip NAME:TAG")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="GPT size")
    p.add_argument("--n-prefix", type=at_least(1), default=1, help="prefix tokens the CLIP embedding becomes")
    p.add_argument("--dropout", type=fraction, default=None, help="override the preset's dropout")
    p.add_argument("--out-dir", default=None, help="default runs/gpt-PRESET")
    p.add_argument("--shards", default=None, help="pre-encoded folder (OUT of preencode.py: train/, val/)")
    datasets.add_data_args(p)
    g = p.add_argument_group("conditioning")
    g.add_argument("--cond", choices=["image", "text"], default="image",
                   help="image: language-free (CLIP image embedding); text: caption embedding (comparison)")
    g.add_argument("--embed-noise", type=non_negative_float, default=0.0, help="std of noise on the normalised embedding")
    g.add_argument("--cond-drop", type=fraction, default=0.1, help="probability of the null condition (CFG)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=at_least(1), default=64, help="global batch, split over processes")
    g.add_argument("--lr", type=non_negative_float, default=6e-4)
    g.add_argument("--weight-decay", type=non_negative_float, default=0.1)
    g.add_argument("--warmup-steps", type=at_least(0), default=200)
    g.add_argument("--max-steps", type=at_least(1), default=5000)
    g.add_argument("--grad-clip", type=non_negative_float, default=1.0)
    g.add_argument("--strategy", choices=FS.STRATEGIES, default="ddp",
                   help="with several processes: ddp (a full copy per rank) or fsdp (parameters, gradients and "
                        "optimizer state sharded over the ranks; checkpoints are the same full state dicts)")
    g.add_argument("--ema-decay", type=fraction, default=0.999, help="0 = no EMA")
    g.add_argument("--max-nonfinite", type=at_least(1), default=10,
                   help="stop after this many non-finite losses in a row (their updates are skipped); under "
                        "--precision fp16, steps whose gradients overflow are the loss scaler's to skip and do "
                        "not count")
    g = add_run_args(p, val_every=500, save_every=500,
                     init_from="a train_gpt.py checkpoint, an exported .safetensors or a CLIP-GEN gpt_*.pt, whose "
                               "codes, token count and condition width match --vqgan and --clip (--preset and "
                               "--n-prefix do not apply; --dropout does; --cond-drop > 0 trains its null condition)",
                     compiles="the training forward", val_batches=True)
    g.add_argument("--sample-every", type=at_least(0), default=1000, help="sample grid cadence (0 = only at the end)")
    g.add_argument("--prompts", nargs="*", default=DEFAULT_PROMPTS, help="text prompts for sample grids")
    g.add_argument("--sample-cfg", type=float, default=1.0, help="guidance scale for sample grids")
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or f"runs/gpt-{args.preset}"
    if args.cond == "text" and args.dataset in ("shapes", "scenes"):
        args.shapes_split = "captioned"  # captions exist only in the captioned split
    return args


def noisy(cond: torch.Tensor, std: float) -> torch.Tensor:
    """Gaussian noise on the unit sphere's neighbourhood, projected back onto it."""
    if std <= 0:
        return cond
    return F.normalize(cond + std * torch.randn_like(cond), dim=-1)


def null_rows(p: float, seed: int, step: int, env, rows: int) -> torch.Tensor:
    """Which of this rank's `rows` take the null condition (B,) bool: drawn for the whole global batch from
    (seed, step) alone, then this rank's contiguous slice (the slice the batch sampler gives it), so N
    processes drop exactly the samples one process would and a resumed run draws what it would have."""
    if p <= 0:
        return torch.zeros(rows, dtype=torch.bool, device=env.device)
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    mask = torch.rand(rows * env.world_size, generator=g) < p
    return mask[env.rank * rows:(env.rank + 1) * rows].to(env.device)


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
        check_models(vqgan, clip, train_ds, val_ds)  # refuse shards another VQGAN or CLIP made
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


def build_model(args, run, vqgan, clip) -> GPT:
    """The GPT to train: a resumed run's config (its weights follow), the --init-from file's model (weights
    and config; --dropout may change), or a fresh one of --preset. Its tokens and condition must be what
    --vqgan and --clip give."""
    init = load_gpt(run.init_from) if run.init_from else None  # CLIP-GEN files: n_tokens from block_size
    if run.state:
        cfg = project_config(run.state)
    elif init is not None:
        cfg = replace(init.cfg, **({"dropout": args.dropout} if args.dropout is not None else {}))
    else:
        over = {"n_prefix": args.n_prefix, **({"dropout": args.dropout} if args.dropout is not None else {})}
        cfg = build_gpt(args.preset, vocab_size=vqgan.cfg.n_codes, n_tokens=vqgan.cfg.grid_size ** 2,
                        cond_dim=clip.embed_dim, null_cond_trained=args.cond_drop > 0, **over).cfg
    want = (vqgan.cfg.n_codes, vqgan.cfg.grid_size ** 2, clip.embed_dim)
    if (cfg.vocab_size, cfg.n_tokens, cfg.cond_dim) != want:
        source = f"--init-from {run.init_from}" if init is not None else "the resumed checkpoint"
        raise UsageError(f"{source}: the GPT writes {cfg.n_tokens} tokens of {cfg.vocab_size} codes from "
                         f"{cfg.cond_dim}-d embeddings; --vqgan has {want[1]} tokens of {want[0]} codes and "
                         f"--clip gives {want[2]}-d embeddings")
    # Condition dropout trains the null condition, whoever trained the rest (a CLIP-GEN GPT never did).
    model = GPT(replace(cfg, null_cond_trained=cfg.null_cond_trained or args.cond_drop > 0))
    model.cfg.check_guidance(args.sample_cfg)  # now, not at the first sample grid
    if init is not None:
        model.load_state_dict(init.state_dict())
    return model


def checkpoint_entries(args, raw: GPT, opt, ema, guard: NonFiniteGuard, fsdp: bool) -> dict:
    """The GPT's own checkpoint entries; under FSDP full state dicts gathered on rank 0 (a collective)."""
    if fsdp:
        entries = {"model": FS.full_model_state(raw), "optimizer": FS.full_optimizer_state(raw, opt)}
        if ema is not None:
            entries["ema"] = FS.full_model_state(ema.model)
    else:
        entries = {"model": raw.state_dict(), "optimizer": opt.state_dict()}
    return {"config": raw.cfg.to_dict(), **entries, "nonfinite_steps": guard.total,
            "conditioning": {"cond": args.cond, "embed_noise": args.embed_noise, "cond_drop": args.cond_drop,
                             "clip": str(args.clip), "vqgan": str(args.vqgan)}}


def save_samples(run, model: GPT, vqgan, clip, val_ds, conditioner, fsdp: bool) -> None:
    """samples.png and its TensorBoard image, on rank 0. Sampling calls the model's parts one by one (KV
    cache), which FSDP's sharded root does not gather for: it samples a gathered, ordinary copy instead."""
    if fsdp:
        full = FS.full_model_state(model)  # a collective: every rank
        model = GPT(model.cfg).to(run.env.device).eval() if run.env.is_main else None
        if run.env.is_main:
            model.load_state_dict(full)
    if run.env.is_main:
        a = run.args
        grid = sample_grid(model, vqgan, clip, val_ds, conditioner, a.prompts, a.sample_cfg, a.seed)
        ckpt.atomic_write(run.out / "samples.png", lambda tmp: save_image(grid, tmp, format="png"))
        run.log.image("samples (rows: real, from image embedding, from each prompt)", grid, run.step)


def main(args) -> None:
    run = Run(args, "gpt", best_key="best_val_loss", higher_is_better=False)
    env, precision = run.env, run.precision
    vqgan = load_vqgan(args.vqgan).to(env.device).eval().requires_grad_(False).channels_last()
    clip = load_clip(args.clip, device=env.device)
    conditioner = Conditioner(vqgan, clip, args.cond, env.device, precision.autocast)
    train_ds, val_ds = build_data(args, env, vqgan, clip)

    raw = build_model(args, run, vqgan, clip).to(env.device)
    cfg, fsdp = raw.cfg, args.strategy == "fsdp" and env.distributed  # one process: nothing to shard
    ema = run.restore_weights({"model": raw}, args.ema_decay)  # full state dicts: before any sharding
    if fsdp:  # the EMA is sharded the same way, so its update stays a local op on each rank's shard
        FS.shard(raw, env.device)
        if ema is not None:
            FS.shard(ema.model, env.device)
    # Fused AdamW on FSDP's sharded parameters cannot take the fp16 scaler's overflow flag (a (1,) tensor
    # against 0-d DTensor step counts, PyTorch 2.14): the foreach path then.
    fused = D.fused_optimizer(env.device) and not (fsdp and precision.scaler.is_enabled())
    opt = torch.optim.AdamW(raw.param_groups(args.weight_decay), lr=args.lr, betas=(0.9, 0.95), fused=fused)
    run.restore_training({"optimizer": opt}, partial(FS.load_optimizer_state, raw) if fsdp else ckpt.load_optimizer_state)
    guard = NonFiniteGuard(args.max_nonfinite, run.resumed("nonfinite_steps", 0))
    model = DDP(raw) if env.distributed and not fsdp else raw
    if args.compile:  # training forward only: validation, EMA, sampling and checkpoints use the plain modules
        model = torch.compile(model)
    train_loader, val_loader = run.train_loader(train_ds), run.val_loader(val_ds)

    run.start(f"gpt {args.preset}: {sum(p.numel() for p in raw.parameters()) / 1e6:.1f}M params, {cfg.n_tokens} "
              f"tokens of {cfg.vocab_size} codes, cond {args.cond} ({cfg.cond_dim}-d, noise {args.embed_noise}, "
              f"drop {args.cond_drop}) | {'shards ' + args.shards if args.shards else 'on the fly'}",
              note=" (fsdp)" if fsdp else "")
    metrics: dict = {}
    raw.train()
    for batch in run.batches(train_loader):
        tokens, cond = conditioner(batch)
        cond = noisy(cond, args.embed_noise)
        drop = null_rows(args.cond_drop, args.seed, run.step, env, cond.shape[0])
        lr = lr_at(run.step, args.lr, args.warmup_steps, args.max_steps, "cosine")
        set_lr([opt], lr)
        with precision.autocast:
            logits = model(tokens, cond, drop)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        grad_norm = torch.tensor(0.0)
        if not guard.skip(loss, run):
            norm = precision.step(loss, opt, raw.parameters(), args.grad_clip if args.grad_clip > 0 else None)
            grad_norm = grad_norm if norm is None else FS.full_value(norm)
            precision.update()
            if ema is not None:
                ema.update(raw)
        run.advance(tokens.numel(), {"loss": loss.detach()})

        if run.due(args.log_every):
            rate = run.throughput()
            run.log.scalars({"loss/train": loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                             "perf/tokens_per_s": rate, "nonfinite_steps": guard.total, **precision.scalars()}, run.step)
            run.log.print(f"step {run.step}/{args.max_steps} loss {loss.item():.4f} {rate:.0f} tok/s")
        eval_model = ema.model if ema is not None else raw
        is_best = False
        if run.due(args.val_every):
            metrics = validate(eval_model, val_loader, conditioner, args.val_batches)
            run.log.scalars(metrics, run.step)
            run.log.print(f"val loss {metrics['val/loss']:.4f} token accuracy {metrics['val/token_accuracy']:.3f}")
            is_best = run.improved(metrics["val/loss"])
        if run.due(args.sample_every):
            save_samples(run, eval_model, vqgan, clip, val_ds, conditioner, fsdp)
        run.checkpoint(is_best, lambda: checkpoint_entries(args, raw, opt, ema, guard, fsdp))

    run.finish(metrics and f"val loss {metrics['val/loss']:.4f}, token accuracy {metrics['val/token_accuracy']:.3f}, "
                           f"non-finite steps {guard.total}")


if __name__ == "__main__":
    run(main, parse_args())
