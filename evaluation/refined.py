"""evaluate.py --refine-steps: the shared part of the Shapes and scenes evaluations.

For each prompt the --refine-top best of its samples (by CLIP similarity to the text; all of them by
default) are refined toward the sampling condition (models/refine.py), decoded and scored again. The
worlds' evaluations judge the refined images with their own judges; this module picks the rows, runs the
refinement, times it and sums up the CLIP side, so that a rising CLIP score and the judged fidelity can be
read side by side.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from engine.cli import UsageError
from models.refine import RefineConfig, add_args, from_args


def add_refine_args(p: argparse.ArgumentParser) -> None:
    g = add_args(p)
    g.add_argument("--refine-top", type=int, default=None,
                   help="candidates per prompt refined: the best by CLIP score (default: all --samples, so the "
                        "refined raw share covers every sample)")


def refine_config(args) -> RefineConfig:
    """The flags as a RefineConfig; UsageError (one line) for a setting that cannot run."""
    cfg = from_args(args)
    if args.refine_top is not None:
        if cfg.steps == 0:
            raise UsageError("--refine-top goes with --refine-steps")
        if not 1 <= args.refine_top <= args.samples:
            raise UsageError(f"--refine-top must be between 1 and --samples {args.samples}, got {args.refine_top}")
    return cfg


def refine_rows(pipe, tokens: torch.Tensor, cond: torch.Tensor, scores: torch.Tensor, samples: int, top: int,
                cfg: RefineConfig, seed: int, batch_size: int) -> dict:
    """tokens (P * samples, h, w) of P prompts, cond (P * samples, D) their sampling conditions, scores
    (P * samples,) their CLIP similarity to the text -> the `top` best rows of each prompt (rows, (P * top,)
    indices into the inputs, best first) refined: their images, and the seconds the refinement took."""
    per_prompt = scores.view(-1, samples).argsort(dim=1, descending=True)[:, :top]      # (P, top)
    rows = (per_prompt + torch.arange(len(per_prompt), device=scores.device)[:, None] * samples).flatten()
    t0 = time.perf_counter()
    refined = pipe.refine(tokens[rows], cond[rows], cfg, seed=seed, batch_size=batch_size)
    images = pipe.decode(refined)
    return {"rows": rows, "images": images, "tokens": refined, "seconds": time.perf_counter() - t0}


class RefineTally:
    """Judged verdicts and CLIP scores of refined candidates against the same candidates before."""

    def __init__(self):
        self.before, self.after, self.best = [], [], []          # verdicts: refined rows before/after, best
        self.clip_before, self.clip_after = [], []
        self.changed, self.seconds, self.images = [], 0.0, 0

    def add(self, before: list, after: list, clip_before, clip_after, changed: float, top: int) -> None:
        """One prompt's `top` refined rows: verdicts (bool or dict) before and after, CLIP scores (top,)."""
        self.before += before
        self.after += after
        self.best.append(after[int(torch.as_tensor(clip_after).argmax())])
        self.clip_before += list(map(float, clip_before))
        self.clip_after += list(map(float, clip_after))
        self.changed.append(changed)

    def summary(self, cfg: RefineConfig, top: int, share) -> dict:
        """share(list of verdicts) -> {key: fraction}: the world's way of summing verdicts."""
        return {"steps": cfg.steps, "lr": cfg.lr, "noise": cfg.noise, "views": cfg.views, "shift": cfg.shift,
                "max_move": cfg.max_move, "quantize": cfg.quantize, "prior_weight": cfg.prior_weight, "top": top,
                "before": share(self.before), "refined": share(self.after), "refined_reranked": share(self.best),
                "clip_score": {"before": float(np.mean(self.clip_before)), "refined": float(np.mean(self.clip_after))},
                "tokens_changed": float(np.mean(self.changed)), "seconds": self.seconds,
                "seconds_per_image": self.seconds / max(1, self.images)}


def refine_markdown(f: dict, cols, names=None) -> str:
    """The refinement's table (cols: the keys of f's shares, names: their headings): the refined candidates
    before and after, the best of them by CLIP score, CLIP's own view of them."""
    q = "" if f["quantize"] == "st" else f", {f['quantize']}"
    move = "" if f["max_move"] is None else f", max move {f['max_move']:g}"
    lines = [f"refinement: {f['steps']} steps (lr {f['lr']:g}, noise {f['noise']:g}, {f['views']} views, shift "
             f"{f['shift']}{move}{q}, prior weight {f['prior_weight']:g}) on the best {f['top']} of each prompt's "
             "samples",
             f"| refined candidates | {' | '.join(names or cols)} | CLIP score |", f"|---|{'---|' * (len(cols) + 1)}"]
    for name, key, clip in (("before", "before", "before"), ("refined", "refined", "refined"),
                            ("refined, re-ranked", "refined_reranked", None)):
        score = f"{f['clip_score'][clip]:.3f}" if clip else ""
        lines.append(f"| {name} | " + " | ".join(f"{f[key][c]:.1%}" for c in cols) + f" | {score} |")
    lines.append(f"{f['tokens_changed']:.0%} of the tokens changed; {f['seconds']:.0f} s of refinement, "
                 f"{f['seconds_per_image']:.2f} s per image")
    return "\n".join(lines)
