"""Test-time refinement (TR0N, VQGAN-CLIP): the prior proposes token grids, CLIP's gradient corrects them.

    tokens = refine(vqgan, clip, tokens, target, RefineConfig(steps=30), prior=score_fn)

Each grid's code vectors (B, D, h, w) become a continuous latent z. Every step decodes z through the VQGAN
decoder, embeds the picture (and `views - 1` randomly shifted copies of it, against pixels that fool CLIP
at one alignment only) with the CLIP image encoder, and moves z up the mean cosine similarity to the target
embedding (the prompt's text embedding, or a picture's image embedding): a step of `lr` along each grid's
gradient scaled to unit RMS, so positions CLIP cares little about barely move (Adam's per-element steps
moved every position and changed 70% of the tokens in 5 steps), plus optional Langevin noise.

With `quantize="st"` (the default) the decoder sees the nearest codes of z (straight-through gradients), so
every step's picture is a picture of tokens, and the grid returned is the step that scored best, the start
included: CLIP's clean (unshifted) score plus `prior_weight` times the prior's mean log-likelihood per token
(`prior(tokens) -> (B,)`, e.g. the GPT's; models.pipeline passes it). Measured on the Shapes world: CLIP's
score alone rose while the pixel judge fell (small squares lost their corners: 94% -> 74% all attributes
right at 30 steps), because CLIP barely tells a ragged small square from a clean one; weighed by the GPT's
likelihood, the same refinement keeps the shapes the prior draws and fixes the colours it missed.
`quantize="final"` optimises the continuous latent and snaps it to the nearest codes once, at the end
(VQGAN-CLIP's way); the snap undoes part of the gain and nothing can be kept per step.
`max_move` bounds how far each position's vector may move from its start (L2; with l2-normalised codes the
codes are unit vectors, so 2 is no bound).

Tokens in, tokens out: TextToImage calls it between sampling and re-ranking, for any prior.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange

from engine.errors import UsageError
from models.clip import CLIP
from models.vqgan import VQGAN


@dataclass(frozen=True)
class RefineConfig:
    steps: int = 0             # 0: refinement off, the grids come back as they are
    lr: float = 0.05           # step length on the latent, per unit RMS of the gradient (codes: unit vectors)
    noise: float = 0.0         # Langevin noise: std of the Gaussian added to z after each step, times sqrt(lr)
    views: int = 4             # pictures CLIP sees per grid per step: the clean one + views-1 shifted copies
    shift: int = 4             # the copies' largest shift in pixels (each way); 0 shifts nothing
    max_move: float | None = None  # largest L2 distance of a position's vector from its start; None: unbounded
    quantize: str = "st"       # st: straight-through nearest codes every step; final: snap once at the end
    prior_weight: float = 0.05  # weight of the prior's mean log-likelihood per token when picking the best step

    def check(self) -> "RefineConfig":
        """Raises UsageError (one line) for a setting that cannot run; returns self."""
        if self.steps < 0:
            raise UsageError(f"--refine-steps must be 0 or more, not {self.steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"--refine-lr must be a positive number, not {self.lr}")
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise UsageError(f"--refine-noise must be 0 or more, not {self.noise}")
        if self.views < 1:
            raise UsageError(f"--refine-views must be at least 1, not {self.views}")
        if self.shift < 0:
            raise UsageError(f"--refine-shift must be 0 or more pixels, not {self.shift}")
        if self.max_move is not None and not (math.isfinite(self.max_move) and self.max_move > 0):
            raise UsageError(f"--refine-max-move must be a positive number, not {self.max_move}")
        if not (math.isfinite(self.prior_weight) and self.prior_weight >= 0):
            raise UsageError(f"--refine-prior-weight must be 0 or more, not {self.prior_weight}")
        if self.quantize not in ("st", "final"):
            raise UsageError(f"unknown refinement quantisation {self.quantize!r}; choose st or final")
        return self


def add_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The refinement flags (demo.py, evaluate.py), defaults from RefineConfig; read them with from_args."""
    d = RefineConfig()
    g = p.add_argument_group("test-time refinement (models/refine.py)")
    g.add_argument("--refine-steps", type=int, default=0,
                   help="refinement steps on each kept candidate's latent, toward the prompt (default 0: off)")
    g.add_argument("--refine-lr", type=float, default=d.lr,
                   help=f"step length on the latent per unit RMS of the gradient (default {d.lr})")
    g.add_argument("--refine-noise", type=float, default=d.noise,
                   help=f"Langevin noise per step, times sqrt(lr) (default {d.noise})")
    g.add_argument("--refine-views", type=int, default=d.views,
                   help=f"pictures CLIP sees per step: the clean one and shifted copies (default {d.views})")
    g.add_argument("--refine-shift", type=int, default=d.shift,
                   help=f"the copies' largest shift in pixels (default {d.shift})")
    g.add_argument("--refine-max-move", type=float, default=d.max_move,
                   help="largest L2 move of a position's code vector from its start (default: unbounded)")
    g.add_argument("--refine-prior-weight", type=float, default=d.prior_weight,
                   help="weight of the GPT's mean log-likelihood per token when the best step is picked (0: "
                        f"CLIP's score alone; default {d.prior_weight})")
    g.add_argument("--refine-quantize", choices=["st", "final"], default=d.quantize,
                   help="st: nearest codes every step (straight-through), the best step kept; final: "
                        f"continuous, snapped once at the end (default {d.quantize})")
    return g


def from_args(args: argparse.Namespace) -> RefineConfig:
    """add_args's flags as a checked RefineConfig (UsageError, one line, for a setting that cannot run)."""
    return RefineConfig(steps=args.refine_steps, lr=args.refine_lr, noise=args.refine_noise,
                        views=args.refine_views, shift=args.refine_shift, max_move=args.refine_max_move,
                        quantize=args.refine_quantize, prior_weight=args.refine_prior_weight).check()


def shifted(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) -> each image moved by its own random (dy, dx) in [-shift, shift], edges replicated."""
    if shift == 0:
        return images
    b, _, h, w = images.shape
    pad = F.pad(images, (shift, shift, shift, shift), mode="replicate")
    d = torch.randint(0, 2 * shift + 1, (b, 2), generator=generator, device=generator.device).tolist()
    return torch.stack([pad[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(d)])


def _snap(vqgan: VQGAN, z: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) latent -> (B, h, w) indices of the nearest codes (the VQGAN's own lookup)."""
    q = vqgan.quantize
    zf = rearrange(z, "b d h w -> (b h w) d")
    if q.l2_norm:
        zf = F.normalize(zf, dim=1)
    return q.lookup(zf).view(z.shape[0], *z.shape[2:])


def refine(vqgan: VQGAN, clip: CLIP, tokens: torch.Tensor, target: torch.Tensor, cfg: RefineConfig,
           seed: int = 0, scores_out: list | None = None,
           prior: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """tokens (B, h, w), target (D,) or (B, D) unit embeddings -> refined tokens (B, h, w) (see the module
    docstring). prior: grids (B, h, w) -> (B,) mean log-likelihood per token, weighed by cfg.prior_weight
    when the best step is picked (None: CLIP's score alone). `scores_out`, if given, receives the batch's
    mean clean CLIP score at each step (steps + 1 floats, the start first): how CLIP's score rose."""
    cfg.check()
    if cfg.steps == 0:
        return tokens
    device = tokens.device
    target = F.normalize(target.float().to(device).expand(len(tokens), -1), dim=-1)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        z0 = vqgan.quantize.embed(tokens).float()
    z = z0.clone().requires_grad_(True)
    best_tokens, best_score = tokens.clone(), None
    with torch.enable_grad():
        for step in range(cfg.steps + 1):
            idx = _snap(vqgan, z.detach())
            if cfg.quantize == "st":
                zq = vqgan.quantize.embed(idx)
                x = vqgan.decode(z + (zq - z).detach())
            else:
                x = vqgan.decode(z)
            x = x.clamp(-1, 1)
            views = [x] + [shifted(x, cfg.shift, g) for _ in range(cfg.views - 1)]
            emb = F.normalize(clip.image_features(clip.preprocess(torch.cat(views))), dim=-1)
            sim = (emb.view(cfg.views, len(x), -1) * target).sum(-1)  # (views, B)
            clean = sim[0].detach()
            if scores_out is not None:
                scores_out.append(float(clean.mean()))
            if cfg.quantize == "st":  # this step's picture is the picture of idx: keep each grid's best
                score = clean + cfg.prior_weight * prior(idx) if prior is not None and cfg.prior_weight else clean
                better = torch.ones_like(score, dtype=torch.bool) if best_score is None else score > best_score
                best_tokens[better] = idx[better]
                best_score = score if best_score is None else torch.maximum(best_score, score)
            if step == cfg.steps:
                break
            z.grad = None
            (-sim.mean(0).sum()).backward()
            with torch.no_grad():  # each grid's gradient at unit RMS: positions CLIP cares little about stay
                rms = z.grad.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)
                z.sub_(cfg.lr * z.grad / rms)
                if cfg.noise > 0:
                    z.add_(torch.randn(z.shape, generator=g, device=device) * cfg.noise * math.sqrt(cfg.lr))
                if cfg.max_move is not None:
                    d = z - z0
                    n = d.norm(dim=1, keepdim=True).clamp_min(1e-12)
                    z.copy_(z0 + d * (cfg.max_move / n).clamp(max=1.0))
    if cfg.quantize == "st":
        return best_tokens
    return _snap(vqgan, z.detach())
