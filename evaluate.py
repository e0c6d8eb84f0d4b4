"""Prompt fidelity on the Shapes world: do text prompts give images with the attributes they name?
And on real captioned images (--dataset folder / coco): CLIP score against the captions, and FID.

    python evaluate.py --vqgan V --gpt G --clip C --prompts 200 --samples 16

For each of --prompts prompts (attribute combinations drawn from the test seed, written with varied
templates; --named says which attributes they name), samples --samples images through the same pipeline
demo.py uses and judges each image from its pixels (evaluation/judge.py). Reports:

- prompt fidelity: the share of raw samples whose named attributes are all right (and per attribute), and
  the same after CLIP re-ranking (the best of each prompt's samples);
- CLIP score: cosine similarity of the CLIP image embedding to the text embedding (raw mean, kept mean);
- diversity of the attributes a prompt leaves unnamed: distinct values over each prompt's raw samples
  (mean and minimum over prompts) and their normalised entropy;
- Fréchet distance between the CLIP image embeddings of all raw samples and of as many held-out real
  renders (--fd-real), and, with --fid (needs torch-fidelity and its Inception weights), FID.

--cond-source image conditions on the CLIP image embedding of a render of each prompt's attributes instead
of the text (the GPT's fidelity without the text-image gap: a diagnostic). Markdown on stdout, JSON with
--json.

--world scenes measures the scenes world (specs/shapes-scenes.md; evaluation/scenes_eval.py) instead: the
five prompt categories (single, two objects, counting, colour attribution, position), --prompts of each,
judged from pixels (evaluation/scenes_judge.py), raw and re-ranked, per category and their mean ("overall"),
and the decomposition's part (a), CLIP alone: does the text embedding score a matching render above its hard
negatives? --clip-only measures just that, from --clip alone. --cond-source image is part (b), the GPT
alone; the text condition is (c), the whole path.

    python evaluate.py --world scenes --vqgan V --gpt G --clip C --prompts 100 --samples 16
    python evaluate.py --world scenes --clip-only --clip C

--dataset folder (images with sidecar .txt captions) or coco (--coco-annotations) evaluates on real images
instead: see evaluation/real.py. --fid reads torch-fidelity's Inception weights from --inception-weights
or torch's hub cache and never downloads them (evaluation/fid.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch

from datasets import shapes
from engine import distributed as D
from engine.cli import Parser, UsageError, check_sampling_numbers, run
from evaluation import real as real_data
from evaluation import scenes_eval
from evaluation.fid import fid, frechet_distance, inception_weights, torch_fidelity
from evaluation.judge import judge
from evaluation.refined import RefineTally, add_refine_args, refine_config, refine_markdown, refine_rows
from models.flow import add_flow_args, add_parallel_args, apply_flow_args, apply_parallel_args, describe
from models.gpt import decoding_window
from models.pipeline import TextToImage

NAMED = {"all": ("color", "shape", "size", "position"), "color+shape": ("color", "shape"),
         "color+shape+size": ("color", "shape", "size"), "color+shape+position": ("color", "shape", "position")}
N_VALUES = {"color": len(shapes.COLORS), "shape": len(shapes.SHAPES), "size": len(shapes.SIZES),
            "position": len(shapes.ROWS) * len(shapes.COLS)}
REAL_OFFSET = 1_000_000  # held-out real renders: test-split indices far from the prompts'


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vqgan", help="required, except with --clip-only")
    p.add_argument("--gpt", help="required, except with --clip-only")
    p.add_argument("--clip", required=True)
    p.add_argument("--world", choices=["shapes", "scenes"], default="shapes",
                   help="shapes: one object per image (--named attributes); scenes: several objects, the five "
                        "prompt categories of specs/shapes-scenes.md")
    p.add_argument("--clip-only", action="store_true",
                   help="scenes: only the decomposition's part (a), CLIP alone (needs just --clip)")
    p.add_argument("--prompts", type=int, default=None,
                   help="number of prompts, default 200 (scenes: per category, default 100; real data: of "
                        "captioned images, spread evenly over the dataset)")
    p.add_argument("--samples", type=int, default=16, help="samples per prompt (the re-ranking candidates)")
    p.add_argument("--named", choices=sorted(NAMED), default=None,
                   help="Shapes: attributes each prompt names (default all)")
    p.add_argument("--cond-source", choices=["text", "image"], default="text",
                   help="text: the prompt's CLIP text embedding; image: the CLIP image embedding of a render of "
                        "its attributes (Shapes), of a scene that satisfies it (scenes) or of the captioned image "
                        "itself (real data)")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128, help="images sampled at once (several prompts)")
    p.add_argument("--device", default=None)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--no-ema", action="store_true", help="use the GPT's raw weights, not its EMA (short runs)")
    p.add_argument("--fd-real", type=int, default=None,
                   help="Shapes: held-out real renders for the Fréchet distance (default: as many as samples; "
                        "0 = skip)")
    p.add_argument("--fid", action="store_true",
                   help="also Inception FID through torch-fidelity (its weights must be on disk: "
                        "--inception-weights)")
    p.add_argument("--inception-weights", default=None,
                   help="torch-fidelity's Inception weights file for --fid (default: torch's hub cache, "
                        "<TORCH_HOME>/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth); never downloaded")
    p.add_argument("--dataset", choices=["shapes", *real_data.REAL_DATASETS], default="shapes",
                   help="shapes: prompts from the attribute vocabulary, judged from pixels; folder / coco: real "
                        "captioned images (--prompts of them), CLIP score against the captions and --fid")
    p.add_argument("--data-path", help="folder: image root, each image's caption in a .txt beside it (a.jpg, "
                                       "a.txt); coco: the image folder")
    p.add_argument("--coco-annotations", help="coco: the captions_*.json of the --data-path images")
    p.add_argument("--json", default=None, help="also write the results here")
    add_refine_args(p)
    add_flow_args(p)
    add_parallel_args(p)
    args = p.parse_args(argv)
    if args.prompts is None:
        args.prompts = 100 if args.world == "scenes" else 200
    for name in ("prompts", "samples", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    check_sampling_numbers(args, seed_scale=200_003)  # evaluate seeds batches with seed * 100_003 + offset
    if args.json:
        check_writable(args.json)
    if args.world == "scenes":
        if args.dataset != "shapes":
            raise UsageError("--world scenes measures the scenes world; --dataset folder or coco is for real images")
        for flag in ("named", "fd_real", "data_path", "coco_annotations"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} is not for --world scenes")
        if args.fid:
            raise UsageError("--fid is not for --world scenes")
        if args.clip_only and args.cond_source != "text":
            raise UsageError("--clip-only measures CLIP alone; --cond-source is for sampling")
    elif args.clip_only:
        raise UsageError("--clip-only is for --world scenes")
    args.refine = refine_config(args)
    if args.refine.steps and (args.clip_only or args.dataset != "shapes"):
        raise UsageError("--refine-steps is for sampling on the Shapes or scenes world")
    if not args.clip_only and (args.vqgan is None or args.gpt is None):
        raise UsageError("--vqgan and --gpt are required (only --world scenes --clip-only runs without them)")
    if args.dataset == "shapes" and args.world == "shapes":
        args.named = args.named or "all"
        for flag in ("data_path", "coco_annotations"):
            if getattr(args, flag):
                raise UsageError(f"--{flag.replace('_', '-')} is for --dataset folder or coco")
    elif args.world == "shapes":
        for flag in ("named", "fd_real"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} is for the Shapes world (--dataset shapes)")
    return args


def check_writable(path: str) -> None:
    """Before any sampling: the --json file's folder exists and takes files (not a lost run at the end)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"--json {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"--json {path} is a folder; give a file name")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"--json {path}: cannot write in {folder}")


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


def diversity(judged: list, attr: str) -> tuple[int, float]:
    """(distinct values, normalised entropy) of one attribute over the judged samples that show an object."""
    if attr == "position":
        vals = [j.row * len(shapes.COLS) + j.col for j in judged if j.found]
    else:
        vals = [getattr(j, attr) for j in judged if j.found and getattr(j, attr) >= 0]
    if not vals:
        return 0, 0.0
    counts = np.bincount(vals, minlength=N_VALUES[attr])
    p = counts[counts > 0] / counts.sum()
    return int((counts > 0).sum()), float(-(p * np.log(p)).sum() / math.log(N_VALUES[attr]))


def _render_batch(specs) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(shapes.render(s), dtype=np.float32)).permute(2, 0, 1)
                        for s in specs]) / 127.5 - 1


def check_guidance(gpt, cfg_scale: float) -> None:
    """One line, before any sampling, when --cfg-scale asks for guidance from a GPT whose null condition was
    never trained (a CLIP-GEN import): its null prefix is random, so guided samples would be silently wrong."""
    if cfg_scale != 1.0 and not getattr(gpt.cfg, "null_cond_trained", True):
        check = getattr(gpt.cfg, "check_guidance", None)
        if check is not None:
            check(cfg_scale)  # models.gpt.GuidanceError, with the model's own reason
        raise UsageError(f"--cfg-scale {cfg_scale:g} needs a GPT trained with condition dropout; this one's null "
                         f"condition was never trained: use --cfg-scale 1")


def main(args, fid_features=None) -> None:
    """fid_features: a feature network (module, images in [-1, 1] -> (B, F)) to compute --fid with instead of
    torch-fidelity's Inception (tests, or another feature space)."""
    weights = None
    if args.fid:  # before any sampling: a missing package or weights file is a one-line error, not a lost run
        torch_fidelity()
        if fid_features is None:
            weights = inception_weights(args.inception_weights)
    if args.clip_only:  # the decomposition's part (a): CLIP alone, no GPT
        from models.clip import load_clip

        clip = load_clip(args.clip, device=D.checked_device(args.device))
        result = {"world": "scenes", "prompts_per_category": args.prompts, "seed": args.seed, "clip": args.clip,
                  "clip_alone": scenes_eval.clip_alone(clip, scenes_eval.make_prompts(args.prompts, args.seed),
                                                       args.batch_size)}
        _report(scenes_eval.clip_alone_markdown(result["clip_alone"]), result, args.json)
        return
    data = None
    if args.dataset != "shapes":  # a wrong --data-path fails before the models load
        data = real_data.load_captioned(args.dataset, args.data_path, args.coco_annotations)
    pipe = TextToImage.from_paths(args.vqgan, args.gpt, args.clip, device=D.checked_device(args.device),
                                  precision=args.precision, use_ema=not args.no_ema)
    check_guidance(pipe.gpt, args.cfg_scale)
    line = apply_flow_args(pipe.gpt, args)
    if line:
        print(line, flush=True)
    apply_parallel_args(pipe, args)
    if args.world == "scenes":
        result = scenes_eval.evaluate_scenes(pipe, args)
        text = scenes_eval.markdown(result)
    elif data is None:
        result = evaluate_shapes(pipe, args, weights, fid_features)
        text = markdown(result)
    else:
        result = real_data.evaluate_real(
            pipe, real_data.spread_subset(data, args.prompts, pipe.vqgan.cfg.resolution), samples=args.samples,
            cond_source=args.cond_source, cfg_scale=args.cfg_scale, top_k=args.top_k, top_p=args.top_p,
            temperature=args.temperature, seed=args.seed, batch_size=args.batch_size, fid_weights=weights,
            fid_features=fid_features, do_fid=args.fid)
        result.update(dataset=args.dataset, data_path=args.data_path, ema=not args.no_ema, gpt=args.gpt,
                      vqgan=args.vqgan, clip=args.clip)
        text = real_data.markdown(result)
    window = pipe.parallel and decoding_window(pipe.parallel, pipe.window, pipe.gpt.cfg.n_tokens)
    result["prior"] = {**describe(pipe.gpt), **({"parallel": pipe.parallel, "window": window}
                                                 if pipe.parallel else {})}
    _report(text, result, args.json)


def _report(text: str, result: dict, path: str | None) -> None:
    print(text)
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def evaluate_shapes(pipe: TextToImage, args, weights: str | None = None, fid_features=None) -> dict:
    """The Shapes-world numbers of the module docstring, as the dict --json writes."""
    named = NAMED[args.named]
    unnamed = [a for a in shapes.ATTRIBUTES if a not in named]
    specs = prompt_specs(args.prompts, named, args.seed)
    raw = {a: [] for a in (*named, "all")}
    best = {a: [] for a in (*named, "all")}
    div = {a: [] for a in unnamed}
    clip_raw, clip_best, fake_feats, fake_images, gap = [], [], [], [], []
    per_batch = max(1, args.batch_size // args.samples)   # prompts sampled together
    top = args.refine_top or args.samples
    tally = RefineTally()
    t0 = time.time()
    for start in range(0, len(specs), per_batch):
        chunk = specs[start:start + per_batch]
        text = pipe.clip.encode_text([p for _, p in chunk])
        rendered = pipe.clip.encode_image(_render_batch([s for s, _ in chunk]).to(pipe.device))
        gap += (text * rendered).sum(-1).tolist()    # how close the text lands to its scene's image embedding
        cond = (rendered if args.cond_source == "image" else text).repeat_interleave(args.samples, 0)
        seed = args.seed * 100_003 + start
        images, tokens = pipe.sample_conds(cond, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                           cfg_scale=args.cfg_scale, seed=seed, batch_size=args.batch_size)
        feats = pipe.clip.encode_image(images)
        fake_feats.append(feats.cpu())
        if args.refine.steps:
            text_scores = (feats * text.repeat_interleave(args.samples, 0)).sum(-1)
            ref = refine_rows(pipe, tokens, cond, text_scores, args.samples, top, args.refine, seed, args.batch_size)
            ref_scores = (pipe.clip.encode_image(ref["images"]) * text.repeat_interleave(top, 0)).sum(-1)
            tally.seconds += ref["seconds"]
            tally.images += len(ref["rows"])
        if args.fid:
            fake_images.append(images.cpu())
        for k, (spec, _) in enumerate(chunk):
            rows = slice(k * args.samples, (k + 1) * args.samples)
            scores = feats[rows] @ text[k]          # re-ranking is always by the text, as demo.py does
            judged = [judge(img) for img in images[rows]]
            verdicts = [right(spec, j, named) for j in judged]
            best_row = int(scores.argmax())
            for a in named:
                raw[a] += [v[a] for v in verdicts]
                best[a].append(verdicts[best_row][a])
            raw["all"] += [all(v.values()) for v in verdicts]
            best["all"].append(all(verdicts[best_row].values()))
            clip_raw += scores.tolist()
            clip_best.append(float(scores[best_row]))
            for a in unnamed:
                div[a].append(diversity(judged, a))
            if args.refine.steps:
                mine = slice(k * top, (k + 1) * top)
                picked = (ref["rows"][mine] - k * args.samples).tolist()
                tally.add([verdicts[i] for i in picked],
                          [right(spec, judge(img), named) for img in ref["images"][mine]],
                          scores[picked], ref_scores[mine],
                          float((ref["tokens"][mine] != tokens[ref["rows"][mine]]).float().mean()), top)
    seconds = time.time() - t0
    result = {
        "prompts": args.prompts, "samples_per_prompt": args.samples, "named": list(named),
        "cond_source": args.cond_source, "cfg_scale": args.cfg_scale, "top_k": args.top_k, "top_p": args.top_p,
        "temperature": args.temperature, "seed": args.seed, "ema": not args.no_ema,
        "raw": {a: float(np.mean(v)) for a, v in raw.items()},
        "reranked": {a: float(np.mean(v)) for a, v in best.items()},
        "clip_score": {"raw": float(np.mean(clip_raw)), "reranked": float(np.mean(clip_best))},
        "text_image_cosine": float(np.mean(gap)),
        "diversity": {a: {"distinct_mean": float(np.mean([d for d, _ in v])), "distinct_min": int(min(d for d, _ in v)),
                          "of": N_VALUES[a], "entropy": float(np.mean([e for _, e in v])),
                          "distinct_per_prompt": [int(d) for d, _ in v]} for a, v in div.items()},
        "sampling_seconds": seconds - tally.seconds, "gpt": args.gpt, "vqgan": args.vqgan, "clip": args.clip,
    }
    if args.refine.steps:
        result["refine"] = tally.summary(args.refine, top, lambda v: _shares(v, named))
    n_real = len(clip_raw) if args.fd_real is None else args.fd_real
    if n_real > 1:
        real = _real_images(n_real)
        real_feats = torch.cat([pipe.clip.encode_image(r.to(pipe.device)).cpu() for r in real.split(256)])
        result["clip_fd"] = frechet_distance(torch.cat(fake_feats), real_feats)
        result["clip_fd_real_images"] = n_real
        if args.fid:
            result["fid"] = fid(torch.cat(fake_images), real, weights=weights, features=fid_features,
                                device=pipe.device)
    return result


def _shares(verdicts: list[dict], named) -> dict:
    """Shapes verdicts ({attribute: right}) -> the share right per attribute and of all named at once."""
    out = {a: float(np.mean([v[a] for v in verdicts])) for a in named}
    return {**out, "all": float(np.mean([all(v.values()) for v in verdicts]))}


def _real_images(n: int) -> torch.Tensor:
    seed = shapes.SPLIT_SEEDS["test"]
    return torch.cat([_render_batch([shapes.sample_attributes(seed, REAL_OFFSET + i)
                                     for i in range(s, min(n, s + 256))]) for s in range(0, n, 256)])


def markdown(r: dict) -> str:
    named = r["named"]
    cols = (*named, "all")
    lines = [f"| | {' | '.join(cols)} | CLIP score |", f"|---|{'---|' * (len(cols) + 1)}"]
    for name, key in (("raw", "raw"), (f"reranked (best of {r['samples_per_prompt']})", "reranked")):
        lines.append(f"| {name} | " + " | ".join(f"{r[key][c]:.1%}" for c in cols)
                     + f" | {r['clip_score'][key]:.3f} |")
    lines.append("")
    for a, d in r["diversity"].items():
        lines.append(f"unnamed {a}: {d['distinct_mean']:.2f} of {d['of']} values per prompt on average "
                     f"(min {d['distinct_min']}), normalised entropy {d['entropy']:.2f}")
        if d.get("distinct_per_prompt"):
            k = math.ceil(2 * d["of"] / 3)  # for position: 6 of the 9 cells
            share = float(np.mean([n >= k for n in d["distinct_per_prompt"]]))
            lines.append(f"  {share:.0%} of prompts show at least {k} of the {d['of']} values")
    if "text_image_cosine" in r:
        lines.append(f"text-image gap: mean cosine {r['text_image_cosine']:.3f} between a prompt's text embedding "
                     "and the image embedding of a render of its attributes")
    if "clip_fd" in r:
        lines.append(f"Fréchet distance in CLIP space to {r['clip_fd_real_images']} real images: {r['clip_fd']:.4f}")
    if "fid" in r:
        lines.append(f"FID (Inception): {r['fid']:.2f}")
    if "refine" in r:
        lines += ["", refine_markdown(r["refine"], cols)]
    lines.append(f"{r['prompts']} prompts x {r['samples_per_prompt']} samples ({r['cond_source']} condition, "
                 f"guidance {r['cfg_scale']}) in {r['sampling_seconds']:.0f} s")
    return "\n".join(lines)


def _cli(argv=None) -> None:
    main(parse_args(argv))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run(_cli, None)  # a flag error in parse_args is one `error:` line too, not a traceback
