"""Prompt fidelity on the Shapes world: do text prompts give images with the attributes they name?

    python evaluate.py --vqgan V --gpt G --clip C --prompts 100 --samples 16

For each of --prompts prompts (attribute combinations drawn from the test seed, written with varied
templates), samples --samples images through the same pipeline demo.py uses and judges each image from
its pixels (datasets/shapes_judge.py). Reports the share of raw samples whose named attributes are all
right (and per attribute), the same after CLIP re-ranking (the best of each prompt's samples), and the
mean CLIP score; Markdown on stdout, JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from datasets import shapes
from datasets.shapes_judge import judge
from engine.cli import run
from models.pipeline import TextToImage

NAMED = {"all": ("color", "shape", "size", "position"), "color+shape": ("color", "shape")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vqgan", required=True)
    p.add_argument("--gpt", required=True)
    p.add_argument("--clip", required=True)
    p.add_argument("--prompts", type=int, default=100, help="number of prompts")
    p.add_argument("--samples", type=int, default=16, help="samples per prompt (the re-ranking candidates)")
    p.add_argument("--named", choices=sorted(NAMED), default="all", help="attributes each prompt names")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--no-ema", action="store_true", help="use the GPT's raw weights, not its EMA (short runs)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def prompt_specs(n: int, named: tuple, seed: int):
    """n (ShapeSpec, prompt) pairs from the test split; templates vary with the index."""
    out = []
    for i in range(n):
        spec = shapes.sample_attributes(shapes.SPLIT_SEEDS["test"] + seed, i)
        out.append((spec, shapes.describe(spec, named, template=i % len(shapes.TEMPLATES))))
    return out


def right(spec, judged, named) -> dict[str, bool]:
    lab, got = spec.labels(), judged.labels()
    res = {}
    for attr in named:
        keys = ("row", "col") if attr == "position" else (attr,)
        res[attr] = judged.found and all(lab[k] == got[k] for k in keys)
    return res


def main(args) -> None:
    pipe = TextToImage.from_paths(args.vqgan, args.gpt, args.clip, device=args.device, use_ema=not args.no_ema)
    named = NAMED[args.named]
    raw = {a: [] for a in (*named, "all")}
    best = {a: [] for a in (*named, "all")}
    clip_scores = []
    t0 = time.time()
    for i, (spec, prompt) in enumerate(prompt_specs(args.prompts, named, args.seed)):
        gen = pipe(prompt, n_candidates=args.samples, rerank=True, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, cfg_scale=args.cfg_scale, seed=args.seed * 100_003 + i)
        verdicts = [right(spec, judge(img), named) for img in gen.images]   # sorted best first
        for a in named:
            raw[a] += [v[a] for v in verdicts]
            best[a].append(verdicts[0][a])
        raw["all"] += [all(v.values()) for v in verdicts]
        best["all"].append(all(verdicts[0].values()))
        clip_scores += gen.scores.tolist()
    result = {
        "prompts": args.prompts, "samples_per_prompt": args.samples, "named": list(named),
        "cfg_scale": args.cfg_scale, "top_k": args.top_k, "top_p": args.top_p, "temperature": args.temperature,
        "raw": {a: float(np.mean(v)) for a, v in raw.items()},
        "reranked": {a: float(np.mean(v)) for a, v in best.items()},
        "clip_score": float(np.mean(clip_scores)), "seconds": time.time() - t0,
        "gpt": args.gpt, "vqgan": args.vqgan, "clip": args.clip,
    }
    cols = (*named, "all")
    print(f"| | {' | '.join(cols)} |\n|---|{'---|' * len(cols)}")
    for name in ("raw", f"reranked (best of {args.samples})"):
        key = "raw" if name == "raw" else "reranked"
        print(f"| {name} | " + " | ".join(f"{result[key][c]:.1%}" for c in cols) + " |")
    print(f"\nCLIP score {result['clip_score']:.3f}; {args.prompts} prompts x {args.samples} samples in "
          f"{result['seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run(main, parse_args())
