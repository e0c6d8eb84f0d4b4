"""The two stage-2 priors' sampling time, side by side on the shipped models, interleaved (GPT, flow at each
step count, GPT, ...), medians: 16 candidates for one prompt, the way demo.py draws them.

- prior: the prior alone (token grids from the condition);
- candidate: prior + VQGAN decode + CLIP score, what re-ranking pays per candidate.

Both priors run on the threads given (default 1 for the GPT, whose per-token steps are too small to share
out, as demo.py does, and `--flow-threads` for the flow, default the same as --threads).

    python bench/prior.py --world shapes --steps 2 4 8 --threads 1 --flow-threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common as C  # noqa: E402
from models.flow import load_prior  # noqa: E402
from models.pipeline import TextToImage  # noqa: E402

PROMPTS = {"shapes": "a small purple square in the top left", "scenes": "a red circle and a blue square"}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", choices=sorted(PROMPTS), default="shapes")
    p.add_argument("--models", default=None, help="folder with gpt.safetensors and flow.safetensors "
                                                  "(default pretrained/WORLD)")
    p.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8], help="flow ODE step counts to time")
    p.add_argument("--solver", choices=["euler", "heun"], default="euler")
    p.add_argument("--candidates", type=int, default=16)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the GPT")
    p.add_argument("--flow-threads", type=int, default=None, help="CPU threads for the flow (default --threads)")
    args = p.parse_args(argv)
    folder = Path(args.models) if args.models else C.REPO / "pretrained" / args.world
    gpt_pipe = TextToImage.from_folder(folder, device="cpu")
    flow_pipe = TextToImage(gpt_pipe.vqgan, load_prior(folder / "flow.safetensors"), gpt_pipe.clip, "cpu")
    flow = flow_pipe.gpt
    cond = gpt_pipe.clip.encode_text([PROMPTS[args.world]])[0].float()
    conds = cond.view(1, -1).expand(args.candidates, -1)
    flow_threads = args.flow_threads or args.threads

    def with_threads(n, fn):
        def call():
            torch.set_num_threads(n)
            return fn()
        return call

    def gpt_prior():
        with torch.no_grad():
            gpt_pipe.gpt.sample(conds, cfg_scale=args.cfg_scale, generator=torch.Generator().manual_seed(0))

    def flow_prior(steps):
        def call():
            with torch.no_grad():
                flow.sample(conds, cfg_scale=args.cfg_scale, steps=steps, solver=args.solver,
                            generator=torch.Generator().manual_seed(0))
        return call

    def candidates(pipe, steps=None):
        def call():
            if steps is not None:
                flow.steps, flow.solver = steps, args.solver
            with torch.no_grad():
                images, _ = pipe.sample(cond, args.candidates, cfg_scale=args.cfg_scale, seed=0)
                pipe.clip.encode_image(images)
        return call

    names = ["gpt"] + [f"flow {s}" for s in args.steps]
    prior_fns = [with_threads(args.threads, gpt_prior)] + [with_threads(flow_threads, flow_prior(s)) for s in args.steps]
    cand_fns = [with_threads(args.threads, candidates(gpt_pipe))] + \
        [with_threads(flow_threads, candidates(flow_pipe, s)) for s in args.steps]
    prior_t = C.timeit_interleaved(prior_fns, torch.device("cpu"), repeats=args.runs)
    cand_t = C.timeit_interleaved(cand_fns, torch.device("cpu"), repeats=args.runs)
    rows = {}
    for name, pt, ct in zip(names, prior_t, cand_t):
        rows[name] = {"prior_ms_per_candidate": pt["median_s"] / args.candidates * 1000,
                      "candidate_ms": ct["median_s"] / args.candidates * 1000,
                      "prior_speedup_vs_gpt": C.round_ratio(prior_t[0]["times_s"], pt["times_s"]),
                      "candidate_speedup_vs_gpt": C.round_ratio(cand_t[0]["times_s"], ct["times_s"])}
    result = {"world": args.world, "cpu": C.cpu_model(), "threads": args.threads, "flow_threads": flow_threads,
              "candidates": args.candidates, "cfg_scale": args.cfg_scale, "solver": args.solver, "runs": args.runs,
              "gpt_n_forwards": gpt_pipe.gpt.cfg.n_tokens, "rows": rows}
    print(f"{args.world}, {args.candidates} candidates, guidance {args.cfg_scale:g}, GPT on {args.threads} thread(s), "
          f"flow on {flow_threads} ({args.solver}), {result['cpu']}, medians of {args.runs} interleaved rounds:")
    print("| prior | network calls | prior ms/candidate | x GPT | with decode + CLIP ms/candidate | x GPT |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        calls = result["gpt_n_forwards"] if name == "gpt" else int(name.split()[1]) * (2 if args.solver == "heun" else 1)
        print(f"| {name} | {calls} | {r['prior_ms_per_candidate']:.2f} | {r['prior_speedup_vs_gpt']:.2f} | "
              f"{r['candidate_ms']:.2f} | {r['candidate_speedup_vs_gpt']:.2f} |")
    return result


if __name__ == "__main__":
    main()
