"""Test-time refinement's cost against sampling more candidates, on the shipped models, interleaved:

- refine: `--steps` refinement steps (models/refine.py, default settings) of `--keep` kept images, the way
  `demo.py --refine-steps 100` runs it (median of --runs);
- sample: `--candidates` candidates sampled and CLIP-scored, the way re-ranking pays for them.

Their ratio is the exchange rate of the equal-wall-time comparison in the README: one refinement step of
one image costs as much as sampling and scoring this many candidates.

    python bench/refine.py --world shapes --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common as C  # noqa: E402
from models.pipeline import TextToImage  # noqa: E402
from models.refine import RefineConfig  # noqa: E402

PROMPTS = {"shapes": "a small purple square in the top left", "scenes": "a red circle and a blue square"}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", choices=sorted(PROMPTS), default="shapes")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--keep", type=int, default=4)
    p.add_argument("--candidates", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = TextToImage.from_folder(C.REPO / "pretrained" / args.world, device="cpu")
    cond = pipe.clip.encode_text([PROMPTS[args.world]])[0]
    _, start = pipe.sample(cond, args.keep, seed=0)
    cfg = RefineConfig(steps=args.steps)
    refine_s, sample_s = [], []
    for run in range(args.runs + 1):  # the first round warms up and is not counted
        t = time.perf_counter()
        pipe.refine(start, cond, cfg, seed=run)
        r = time.perf_counter() - t
        t = time.perf_counter()
        with torch.no_grad():
            images, _ = pipe.sample(cond, args.candidates, seed=run)
            pipe.clip.encode_image(images)
        s = time.perf_counter() - t
        if run:
            refine_s.append(r)
            sample_s.append(s)
    step_ms = statistics.median(refine_s) / (args.steps * args.keep) * 1000
    cand_ms = statistics.median(sample_s) / args.candidates * 1000
    result = {"world": args.world, "threads": args.threads, "cpu": C.cpu_model(), "steps": args.steps,
              "keep": args.keep, "refine_median_s": statistics.median(refine_s), "refine_runs_s": refine_s,
              "image_step_ms": step_ms, "candidate_ms": cand_ms, "candidates_per_image_step": step_ms / cand_ms}
    print(f"{args.world}, {args.threads} thread(s), {result['cpu']}: {args.steps} refinement steps of {args.keep} "
          f"images {result['refine_median_s']:.2f} s (median of {args.runs}; {step_ms:.1f} ms per image-step); "
          f"sampling + scoring {cand_ms:.1f} ms per candidate: one image-step = "
          f"{result['candidates_per_image_step']:.2f} candidates")
    return result


if __name__ == "__main__":
    main()
