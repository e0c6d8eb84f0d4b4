"""Stage 2: train the GPT that writes VQGAN token grids from CLIP embeddings (or, with --model flow, the
flow-matching prior that draws a whole grid in a few ODE steps: models/flow.py).

    python train_gpt.py --vqgan runs/vqgan-shapes/best.pt --clip runs/clip-shapes/best.pt \\
        --shards runs/encoded                                   # from pre-encoded shards (preencode.py)
    python train_gpt.py --vqgan ... --clip ... --dataset folder --data-path imgs/   # encode on the fly
    torchrun --nproc_per_node 8 train_gpt.py ...
    python train_gpt.py --model flow --vqgan ... --clip ... --shards runs/encoded   # the flow prior instead

Language-free: the condition is the CLIP *image* embedding of each training image; no caption reaches
the GPT (--cond image, the default). At inference a CLIP *text* embedding takes its place. --embed-noise
adds Gaussian noise to the normalised embedding (then renormalises) to cover the gap between image and
text embeddings; --cond-drop trains the null condition used by classifier-free guidance. --cond text
trains on caption embeddings instead: the supervised upper bound, for comparison only. The flow prior
takes the same data, conditioning options and runtime (DDP, resume, EMA, checkpoints, export.py); its loss
is the flow-matching velocity error, its validation also the tokens its one-step estimate snaps to.
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
from models.flow import FLOW_PRESETS, FlowPrior, build_flow, flow_config, load_flow, vqgan_codebook
from models.gpt import GPT, PRESETS, build_gpt

DEFAULT_PROMPTS = ["a red circle in the top left", "a blue square at the bottom", "a large green triangle",
                   "a small yellow diamond on the right"]


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vqgan", required=True, help="frozen VQGAN checkpoint (ours, CLIP-GEN or taming)")
    p.add_argument("--clip", required=True, help="frozen CLIP: checkpoint path or open_clip NAME:TAG")
    p.add_argument("--model", choices=["gpt", "flow"], default="gpt",
                   help="gpt: the autoregressive prior (CLIP-GEN); flow: the flow-matching prior (models/flow.py)")
    p.add_argument("--preset", choices=sorted(set(PRESETS) | set(FLOW_PRESETS)), default="tiny",
                   help=f"model size (gpt: {', '.join(PRESETS)}; flow: {', '.join(FLOW_PRESETS)})")
    p.add_argument("--n-prefix", type=at_least(1), default=1, help="gpt: prefix tokens the CLIP embedding becomes")
    p.add_argument("--n-layer", type=at_least(1), default=None, help="gpt: blocks, instead of the preset's")
    p.add_argument("--n-embd", type=at_least(1), default=None, help="gpt: width, instead of the preset's")
    p.add_argument("--n-head", type=at_least(1), default=None,
                   help="gpt: attention heads (must divide the width), instead of the preset's")
    p.add_argument("--cond-hidden", type=at_least(0), default=0,
                   help="gpt: width of an MLP (two GELU layers) the CLIP embedding goes through before becoming the "
                        "prefix; 0: one linear map, as CLIP-GEN")
    p.add_argument("--dropout", type=fraction, default=None, help="override the preset's dropout")
    p.add_argument("--out-dir", default=None, help="default runs/MODEL-PRESET")
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
    g = p.add_argument_group("flow prior (--model flow)")
    g.add_argument("--flow-steps", type=at_least(1), default=8,
                   help="ODE steps the prior samples with by default (stored in it; demo.py --flow-steps overrides)")
    g.add_argument("--flow-solver", choices=["euler", "heun"], default="euler", help="its default ODE solver")
    g.add_argument("--flow-objective", choices=["velocity", "tokens"], default="velocity",
                   help="what the network predicts (a fresh model): the velocity (squared error) or the end point's "
                        "tokens (cross-entropy; the velocity follows from their expected code vectors)")
    g.add_argument("--flow-patch", type=at_least(1), default=2,
                   help="grid positions per side the network reads as one vector (a fresh model)")
    g.add_argument("--flow-time", choices=["uniform", "logit-normal"], default="uniform",
                   help="training times t: uniform on [0, 1], or logit-normal (SD3: more weight mid-way)")
    g = add_run_args(p, val_every=500, save_every=500,
                     init_from="a train_gpt.py checkpoint, an exported .safetensors or a CLIP-GEN gpt_*.pt, whose "
                               "codes, token count and condition width match --vqgan and --clip (--preset, "
                               "--n-prefix, --n-layer/--n-embd/--n-head and --cond-hidden do not apply; --dropout "
                               "does; --cond-drop > 0 trains its null condition)",
                     compiles="the training forward", val_batches=True)
    g.add_argument("--sample-every", type=at_least(0), default=1000, help="sample grid cadence (0 = only at the end)")
    g.add_argument("--prompts", nargs="*", default=DEFAULT_PROMPTS, help="text prompts for sample grids")
    g.add_argument("--sample-cfg", type=float, default=1.0, help="guidance scale for sample grids")
    args = p.parse_args(argv)
    presets = FLOW_PRESETS if args.model == "flow" else PRESETS
    if args.preset not in presets:
        p.error(f"--preset {args.preset} is not a {args.model} preset; choose one of {', '.join(presets)}")
    args.shape = {k: v for k in ("n_layer", "n_embd", "n_head") if (v := getattr(args, k)) is not None}
    if args.shape and args.model != "gpt":
        p.error("--n-layer, --n-embd and --n-head are for --model gpt (the flow prior's size is its --preset)")
    if args.model == "gpt":
        size = {**{k: getattr(PRESETS[args.preset], k) for k in ("n_embd", "n_head")}, **args.shape}
        if size["n_embd"] % size["n_head"]:
            p.error(f"a width of {size['n_embd']} does not split into {size['n_head']} attention heads "
                    "(--n-embd must be a multiple of --n-head)")
    args.out_dir = args.out_dir or f"runs/{args.model}-{args.preset}"
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


def flow_draws(seed: int, step: int, env, rows: int, shape: tuple, time: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The flow prior's training times t (rows,) and noise (rows, *shape) for this rank, drawn for the whole
    global batch from (seed, step) alone and sliced as null_rows does: N processes draw what one would, a
    resumed run what it would have."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step + 7_777)
    n = rows * env.world_size
    t = torch.sigmoid(torch.randn(n, generator=g)) if time == "logit-normal" else torch.rand(n, generator=g)
    noise = torch.randn(n, *shape, generator=g)
    mine = slice(env.rank * rows, (env.rank + 1) * rows)
    return t[mine].to(device), noise[mine].to(device)


def training_loss(model, raw, tokens, cond, drop, args, step: int, env) -> torch.Tensor:
    """The step's loss: next-token cross-entropy for the GPT, the flow-matching velocity error for the flow
    (model: what runs the forward, DDP or compiled; raw: the module itself)."""
    if isinstance(raw, FlowPrior):
        t, noise = flow_draws(args.seed, step, env, tokens.shape[0], (raw.cfg.n_tokens, raw.cfg.latent_dim),
                              args.flow_time, tokens.device)
        x1 = raw.latents(tokens)
        tt = t[:, None, None]
        return raw.objective_loss(model((1 - tt) * noise + tt * x1, t, cond, drop), tokens, x1, noise)
    logits = model(tokens, cond, drop)
    return F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())


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
def validate(model, loader, conditioner, max_batches: int = 0) -> dict:
    """Mean next-token loss and token accuracy (argmax = target) over this rank's share, summed over ranks.
    For a flow prior: the velocity error at fixed times and noise, and the share of tokens its one-step
    estimate of the end point (x_t + (1 - t) v) snaps to."""
    if isinstance(model, FlowPrior):
        return validate_flow(model, loader, conditioner, max_batches)
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
def validate_flow(model: FlowPrior, loader, conditioner, max_batches: int = 0) -> dict:
    was_training = model.training
    model.eval()
    dev = conditioner.device
    sums = torch.zeros(3, dtype=torch.float64, device=dev)  # squared error, correct tokens, grids
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        tokens, cond = conditioner(batch)
        B = tokens.shape[0]
        g = torch.Generator().manual_seed(10_007 + i)  # the same times and noise at every validation
        t = ((torch.arange(B) + 0.5) / B)[torch.randperm(B, generator=g)].to(dev)
        noise = torch.randn(B, model.cfg.n_tokens, model.cfg.latent_dim, generator=g).to(dev)
        x1 = model.latents(tokens)
        tt = t[:, None, None]
        xt = (1 - tt) * noise + tt * x1
        with conditioner.autocast:
            out = model(xt, t, cond).float()
        sums[0] += model.objective_loss(out, tokens, x1, noise).double() * B
        sums[1] += (model.estimate(out, xt, t) == tokens).sum().double()
        sums[2] += B
    D.all_reduce_sum(sums)
    model.train(was_training)
    n = max(1.0, sums[2].item())
    return {"val/loss": sums[0].item() / n, "val/token_accuracy": sums[1].item() / (n * model.cfg.n_tokens)}


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


def check_fits(cfg, vqgan, clip, source: str, does: str) -> None:
    """One line unless a prior's config (GPT or flow) has --vqgan's codes and grid and --clip's width."""
    want = (vqgan.cfg.n_codes, vqgan.cfg.grid_size ** 2, clip.embed_dim)
    if (cfg.vocab_size, cfg.n_tokens, cfg.cond_dim) != want:
        raise UsageError(f"{source}: {does} {cfg.n_tokens} tokens of {cfg.vocab_size} codes from "
                         f"{cfg.cond_dim}-d embeddings; --vqgan has {want[1]} tokens of {want[0]} codes and "
                         f"--clip gives {want[2]}-d embeddings")


def build_flow_model(args, run, vqgan, clip) -> FlowPrior:
    """The flow prior to train: a resumed run's config, the --init-from file's, or a fresh --preset one over
    --vqgan's codes. Its grid, codes and condition must be what --vqgan and --clip give."""
    init = load_flow(run.init_from) if run.init_from else None
    codebook = vqgan_codebook(vqgan).cpu()
    if run.state:
        cfg = flow_config(run.state)
    elif init is not None:
        cfg = replace(init.cfg, **({"dropout": args.dropout} if args.dropout is not None else {}))
    else:
        over = {"dropout": args.dropout} if args.dropout is not None else {}
        cfg = build_flow(args.preset, codebook, n_tokens=vqgan.cfg.grid_size ** 2, cond_dim=clip.embed_dim,
                         l2_codes=vqgan.quantize.l2_norm, patch=args.flow_patch, objective=args.flow_objective,
                         null_cond_trained=args.cond_drop > 0, **over).cfg
    check_fits(cfg, vqgan, clip, f"--init-from {run.init_from}" if init is not None else "the resumed checkpoint",
               "the flow prior draws")
    model = FlowPrior(replace(cfg, null_cond_trained=cfg.null_cond_trained or args.cond_drop > 0,
                              steps=args.flow_steps, solver=args.flow_solver))
    model.cfg.check_guidance(args.sample_cfg)
    if init is not None:
        model.load_state_dict(init.state_dict())
    model.codebook.copy_(codebook)  # the codes of --vqgan, whatever a file held (check_codebook at inference)
    return model


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
        over = {"n_prefix": args.n_prefix, "cond_hidden": args.cond_hidden, **args.shape,
                **({"dropout": args.dropout} if args.dropout is not None else {})}
        cfg = build_gpt(args.preset, vocab_size=vqgan.cfg.n_codes, n_tokens=vqgan.cfg.grid_size ** 2,
                        cond_dim=clip.embed_dim, null_cond_trained=args.cond_drop > 0, **over).cfg
    check_fits(cfg, vqgan, clip, f"--init-from {run.init_from}" if init is not None else "the resumed checkpoint",
               "the GPT writes")
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
        model = type(model)(model.cfg).to(run.env.device).eval() if run.env.is_main else None
        if run.env.is_main:
            model.load_state_dict(full)
    if run.env.is_main:
        a = run.args
        grid = sample_grid(model, vqgan, clip, val_ds, conditioner, a.prompts, a.sample_cfg, a.seed)
        ckpt.atomic_write(run.out / "samples.png", lambda tmp: save_image(grid, tmp, format="png"))
        run.log.image("samples (rows: real, from image embedding, from each prompt)", grid, run.step)


def main(args) -> None:
    run = Run(args, args.model, best_key="best_val_loss", higher_is_better=False)
    env, precision = run.env, run.precision
    vqgan = load_vqgan(args.vqgan).to(env.device).eval().requires_grad_(False).channels_last()
    clip = load_clip(args.clip, device=env.device)
    conditioner = Conditioner(vqgan, clip, args.cond, env.device, precision.autocast)
    train_ds, val_ds = build_data(args, env, vqgan, clip)

    build = build_flow_model if args.model == "flow" else build_model
    raw = build(args, run, vqgan, clip).to(env.device)
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

    size = f" ({cfg.n_layer} layers x {cfg.n_embd})" if args.model == "gpt" else ""
    run.start(f"{args.model} {args.preset}{size}: {sum(p.numel() for p in raw.parameters()) / 1e6:.1f}M params, {cfg.n_tokens} "
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
            loss = training_loss(model, raw, tokens, cond, drop, args, run.step, env)
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
