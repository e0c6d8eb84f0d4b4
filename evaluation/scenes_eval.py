"""evaluate.py --world scenes: the five prompt categories of specs/shapes-scenes.md, judged from pixels.

Prompts (make_prompts): per category, n prompts drawn from the scenes test seed (+ --seed), worded by the
training captions' phrase builders and templates (datasets/scenes.py). Each prompt carries what the judge
needs (an evaluation.scenes_judge.Query), a scene that satisfies it (its cells drawn at random; --cond-source
image conditions on the CLIP image embedding of its render) and its hard negatives: the same scene with one
thing changed so that the prompt no longer holds, the rest (sizes, cells, jitter) kept:

    single              another shape; another colour
    two objects         one of the two shapes replaced by a third
    counting            one object fewer; one more (while the world allows: 1 to 4 objects)
    colour attribution  the two colours swapped between the shapes
    position            the mirrored relation (the two objects trade places)

evaluate_scenes samples --samples images per prompt, judges each (raw) and the one CLIP re-ranking keeps
(the best CLIP score against the text), per category and their mean ("overall"). clip_alone is the
decomposition's part (a): does the CLIP text embedding score the matching render above each of the prompt's
hard negatives? It needs no GPT (evaluate.py --world scenes --clip-only).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from datasets import scenes
from datasets.scenes import COLORS, RELATIONS, SHAPES, SceneObject
from evaluation.refined import RefineTally, refine_markdown, refine_rows
from evaluation.scenes_judge import CATEGORIES, FAILURES, Query, find_objects, right, why_wrong

CATEGORY_NAMES = {"single": "single", "two_objects": "two objects", "counting": "counting",
                  "colour_attribution": "colour attribution", "position": "position"}
FAILURE_NAMES = {"objects": "another number of objects", "unreadable": "an unreadable shape",
                 "kinds": "colours or shapes not named", "swapped": "colours swapped between the shapes",
                 "relation": "the relation wrong"}
N_CELLS = 9


@dataclass(frozen=True)
class ScenePrompt:
    category: str
    text: str
    query: Query
    scene: tuple[SceneObject, ...]                                 # a scene that satisfies the prompt
    negatives: tuple[tuple[str, tuple[SceneObject, ...]], ...]     # (what changed, scene), each fails it


def _other(rng: np.random.Generator, n: int, *taken: int) -> int:
    """A value in range(n) other than those taken, uniformly."""
    return int(rng.choice([v for v in range(n) if v not in taken]))


def _cells(rng: np.random.Generator, k: int) -> list[tuple[int, int]]:
    return [(int(c) // 3, int(c) % 3) for c in rng.choice(N_CELLS, size=k, replace=False)]


def _kinds(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(len(COLORS))), int(rng.integers(len(SHAPES)))


def _swap_kinds(a: SceneObject, b: SceneObject) -> tuple[SceneObject, SceneObject]:
    """a drawn as b's kind and b as a's, each keeping its own geometry: the two trade places."""
    return (dataclasses.replace(a, color=b.color, shape=b.shape), dataclasses.replace(b, color=a.color, shape=a.shape))


def _relation_cells(rng: np.random.Generator, relation: str) -> list[tuple[int, int]]:
    """Two distinct cells, the first `relation` the second (read from the cells as the captions are: left
    of = smaller column, above = smaller row), uniformly among all such ordered pairs."""
    pairs = [(a, b) for a in range(N_CELLS) for b in range(N_CELLS) if a != b
             and relation in scenes.relations_between(
                 SceneObject(0, 0, a // 3, a % 3, 0, 0, 0), SceneObject(0, 0, b // 3, b % 3, 0, 0, 0))]
    a, b = pairs[int(rng.integers(len(pairs)))]
    return [(a // 3, a % 3), (b // 3, b % 3)]


def make_prompt(category: str, split_seed: int, index: int) -> ScenePrompt:
    """Prompt `index` of one category; a pure function of (category, split_seed, index). The template
    cycles with the index, so every wording is used about equally."""
    rng = np.random.default_rng([split_seed, CATEGORIES.index(category), index])
    template = index % len(scenes.TEMPLATES)
    if category == "single":
        c, s = _kinds(rng)
        (cell,) = _cells(rng, 1)
        obj = scenes.place([(c, s, *cell)], rng)
        desc, query = scenes.noun_phrase(c, s), Query(category, ((c, s),))
        negatives = [("other shape", [dataclasses.replace(obj[0], shape=_other(rng, len(SHAPES), s))]),
                     ("other colour", [dataclasses.replace(obj[0], color=_other(rng, len(COLORS), c))])]
    elif category == "two_objects":
        sa = int(rng.integers(len(SHAPES)))
        sb = _other(rng, len(SHAPES), sa)
        colours = [int(rng.integers(len(COLORS))) for _ in range(2)]  # unnamed: any
        obj = scenes.place([(col, s, *cell) for col, s, cell in zip(colours, (sa, sb), _cells(rng, 2))], rng)
        desc = scenes.describe_groups([(None, sa, 1), (None, sb, 1)])
        query = Query(category, ((None, sa), (None, sb)))
        k = int(rng.integers(2))
        changed = list(obj)
        changed[k] = dataclasses.replace(obj[k], shape=_other(rng, len(SHAPES), sa, sb))
        negatives = [("other shape", changed)]
    elif category == "counting":
        c, s = _kinds(rng)
        n = 2 + index % 3  # 2, 3, 4 equally often; with 7 templates every pairing within 21 prompts
        # One cell more than n (while the world allows it): where "one more" puts its extra object.
        everything = scenes.place([(c, s, *cell) for cell in _cells(rng, min(n + 1, scenes.MAX_OBJECTS))], rng)
        obj = everything[:n]
        desc, query = scenes.noun_phrase(c, s, n), Query(category, ((c, s),), count=n)
        gone = int(rng.integers(n))
        negatives = [("one fewer", obj[:gone] + obj[gone + 1:])]
        if len(everything) > n:
            negatives.append(("one more", everything))
    elif category == "colour_attribution":
        ca = int(rng.integers(len(COLORS)))
        cb = _other(rng, len(COLORS), ca)
        sa = int(rng.integers(len(SHAPES)))
        sb = _other(rng, len(SHAPES), sa)
        cells = _cells(rng, 2)
        obj = scenes.place([(ca, sa, *cells[0]), (cb, sb, *cells[1])], rng)
        desc = scenes.describe_groups([(ca, sa, 1), (cb, sb, 1)])
        query = Query(category, ((ca, sa), (cb, sb)))
        swapped = [dataclasses.replace(obj[0], color=cb), dataclasses.replace(obj[1], color=ca)]
        negatives = [("swapped colours", swapped)]
    elif category == "position":
        first = _kinds(rng)
        second = _kinds(rng)
        while second == first:  # two different kinds, as the relation captions name
            second = _kinds(rng)
        relation = RELATIONS[index % len(RELATIONS)]
        cells = _relation_cells(rng, relation)
        obj = scenes.place([(*first, *cells[0]), (*second, *cells[1])], rng)
        desc = scenes.describe_relation(first, relation, second)
        query = Query(category, (first, second), relation=relation)
        negatives = [("mirrored relation", list(_swap_kinds(*obj)))]  # now the first is scenes.MIRROR[relation]
    else:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    return ScenePrompt(category, scenes.apply_template(desc, template), query, tuple(obj),
                       tuple((name, tuple(objs)) for name, objs in negatives))


def make_prompts(per_category: int, seed: int = 0) -> list[ScenePrompt]:
    """per_category prompts of each category, category by category, from the scenes test seed + seed."""
    split_seed = scenes.SPLIT_SEEDS["test"] + seed
    return [make_prompt(c, split_seed, i) for c in CATEGORIES for i in range(per_category)]


def render_batch(scene_list) -> torch.Tensor:
    """Scenes (lists of SceneObject) -> (B, 3, 64, 64) float32 renders in [-1, 1], the models' input."""
    return torch.stack([torch.from_numpy(np.asarray(scenes.render_scene(s), dtype=np.float32)).permute(2, 0, 1)
                        for s in scene_list]) / 127.5 - 1


def encode_renders(clip, scene_list, batch_size: int) -> torch.Tensor:
    """CLIP image embeddings (N, D) of the scenes' renders, batch_size at a time."""
    return torch.cat([clip.encode_image(render_batch(scene_list[i:i + batch_size]).to(clip.device))
                      for i in range(0, len(scene_list), batch_size)])


# ------------------------------------------------------------------------------ (a) CLIP alone

@torch.no_grad()
def clip_alone(clip, prompts: list[ScenePrompt], batch_size: int = 128) -> dict:
    """Does the prompt's text embedding score its matching render strictly above each hard negative?

    {category: {"all": share of prompts whose match beats every negative, <negative name>: share of the
    prompts that have that negative whose match beats it}, "overall": the mean of the categories' "all"}."""
    text = torch.cat([clip.encode_text([p.text for p in prompts[i:i + batch_size]])
                      for i in range(0, len(prompts), batch_size)])                      # (P, D)
    match = encode_renders(clip, [p.scene for p in prompts], batch_size)               # (P, D)
    negs = [(k, name, objs) for k, p in enumerate(prompts) for name, objs in p.negatives]
    neg = encode_renders(clip, [objs for _, _, objs in negs], batch_size)              # (N, D)
    own = (text * match).sum(-1)                                                         # (P,)
    beats = (own[[k for k, _, _ in negs]] > (text[[k for k, _, _ in negs]] * neg).sum(-1)).tolist()
    out: dict = {}
    for c in CATEGORIES:
        ks = [k for k, p in enumerate(prompts) if p.category == c]
        if not ks:
            continue
        every = {k: True for k in ks}
        by_name: dict[str, list[bool]] = {}
        for (k, name, _), b in zip(negs, beats):
            if prompts[k].category == c:
                every[k] &= b
                by_name.setdefault(name, []).append(b)
        out[c] = {"all": float(np.mean(list(every.values()))), **{n: float(np.mean(v)) for n, v in by_name.items()}}
    out["overall"] = float(np.mean([out[c]["all"] for c in CATEGORIES if c in out]))
    return out


def clip_alone_markdown(r: dict) -> str:
    cats = [c for c in CATEGORIES if c in r]
    lines = [f"| CLIP alone: the text scores its scene above every hard negative | "
             f"{' | '.join(CATEGORY_NAMES[c] for c in cats)} | overall |",
             f"|---|{'---|' * (len(cats) + 1)}",
             "| share of prompts | " + " | ".join(f"{r[c]['all']:.1%}" for c in cats) + f" | {r['overall']:.1%} |"]
    return "\n".join(lines + [""] + _by_negative(r))


def _by_negative(r: dict) -> list[str]:
    """One line per category: the share of prompts whose match beats each kind of hard negative."""
    return [f"CLIP alone, {CATEGORY_NAMES[c]}: " + ", ".join(f"{n} {v:.1%}" for n, v in r[c].items() if n != "all")
            for c in CATEGORIES if c in r]


# ------------------------------------------------------------------ (b), (c): sampling through the GPT

def distinct_cells(judged: list[list]) -> int:
    """The distinct grid cells the found objects take over one prompt's samples (what a prompt leaves
    unnamed: where its objects stand)."""
    return len({o.cell for objects in judged for o in objects})


@torch.no_grad()
def evaluate_scenes(pipe, args) -> dict:
    """The scenes numbers as the dict --json writes: per category and "overall" (their mean), raw and
    re-ranked shares right; CLIP scores; the text-image gap; the cells' diversity; (a) CLIP alone."""
    prompts = make_prompts(args.prompts, args.seed)
    raw = {c: [] for c in CATEGORIES}
    best = {c: [] for c in CATEGORIES}
    cells: dict[str, list[int]] = {c: [] for c in CATEGORIES}
    failures: dict[str, list[str]] = {c: [] for c in CATEGORIES}
    clip_raw, clip_best, gap = [], [], []
    per_batch = max(1, args.batch_size // args.samples)   # prompts sampled together
    refine_cfg = getattr(args, "refine", None)
    refining = refine_cfg is not None and refine_cfg.steps > 0
    top = getattr(args, "refine_top", None) or args.samples
    tally = RefineTally()
    t0 = time.time()
    for start in range(0, len(prompts), per_batch):
        chunk = prompts[start:start + per_batch]
        text = pipe.clip.encode_text([p.text for p in chunk])                          # (p, D)
        rendered = pipe.clip.encode_image(render_batch([p.scene for p in chunk]).to(pipe.device))  # (p, D)
        gap += (text * rendered).sum(-1).tolist()
        cond = (rendered if args.cond_source == "image" else text).repeat_interleave(args.samples, 0)
        seed = args.seed * 100_003 + start
        images, tokens = pipe.sample_conds(cond, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                           cfg_scale=args.cfg_scale, seed=seed, batch_size=args.batch_size)
        feats = pipe.clip.encode_image(images)                                          # (p * S, D)
        images = images.cpu()                                                           # the judge reads numpy
        if refining:
            text_scores = (feats * text.repeat_interleave(args.samples, 0)).sum(-1)
            ref = refine_rows(pipe, tokens, cond, text_scores, args.samples, top, refine_cfg, seed, args.batch_size)
            ref_scores = (pipe.clip.encode_image(ref["images"]) * text.repeat_interleave(top, 0)).sum(-1)
            ref_images = ref["images"].cpu()
            tally.seconds += ref["seconds"]
            tally.images += len(ref["rows"])
        for k, p in enumerate(chunk):
            rows = slice(k * args.samples, (k + 1) * args.samples)
            scores = feats[rows] @ text[k]          # re-ranking is always by the text, as demo.py does
            judged = [find_objects(img) for img in images[rows]]
            whys = [why_wrong(p.query, objs) for objs in judged]
            verdicts = [w is None for w in whys]
            failures[p.category] += [w for w in whys if w is not None]
            best_row = int(scores.argmax())
            raw[p.category] += verdicts
            best[p.category].append(verdicts[best_row])
            cells[p.category].append(distinct_cells(judged))
            clip_raw += scores.tolist()
            clip_best.append(float(scores[best_row]))
            if refining:
                mine = slice(k * top, (k + 1) * top)
                picked = (ref["rows"][mine] - k * args.samples).tolist()
                tally.add([(p.category, verdicts[i]) for i in picked],
                          [(p.category, right(p.query, find_objects(img))) for img in ref_images[mine]],
                          scores[picked], ref_scores[mine],
                          float((ref["tokens"][mine] != tokens[ref["rows"][mine]]).float().mean()), top)
    seconds = time.time() - t0

    def shares(v: dict) -> dict:
        out = {c: float(np.mean(v[c])) for c in CATEGORIES}
        return {**out, "overall": float(np.mean(list(out.values())))}

    every = [d for c in CATEGORIES for d in cells[c]]
    result = {
        "world": "scenes", "prompts_per_category": args.prompts, "samples_per_prompt": args.samples,
        "cond_source": args.cond_source, "cfg_scale": args.cfg_scale, "top_k": args.top_k, "top_p": args.top_p,
        "temperature": args.temperature, "seed": args.seed, "ema": not args.no_ema,
        "raw": shares(raw), "reranked": shares(best),
        # Why raw samples are wrong: per category, the share of its samples that fail for each reason of
        # scenes_judge.FAILURES (they sum to 1 - raw).
        "failures": {c: {w: failures[c].count(w) / max(1, len(raw[c])) for w in FAILURES if w in failures[c]}
                     for c in CATEGORIES},
        "clip_alone": clip_alone(pipe.clip, prompts, args.batch_size),
        "clip_score": {"raw": float(np.mean(clip_raw)), "reranked": float(np.mean(clip_best))},
        "text_image_cosine": float(np.mean(gap)),
        "diversity": {"cells": {"distinct_mean": float(np.mean(every)), "distinct_min": int(min(every)),
                                "of": N_CELLS, "per_category": {c: float(np.mean(cells[c])) for c in CATEGORIES},
                                "distinct_per_prompt": every}},
        "sampling_seconds": seconds - tally.seconds, "gpt": args.gpt, "vqgan": args.vqgan, "clip": args.clip,
    }
    if refining:
        def by_category(pairs: list) -> dict:
            return shares({c: [ok for cat, ok in pairs if cat == c] for c in CATEGORIES})

        result["refine"] = tally.summary(refine_cfg, top, by_category)
    return result


def markdown(r: dict) -> str:
    cols = [*CATEGORIES, "overall"]
    names = [CATEGORY_NAMES.get(c, c) for c in cols]
    lines = [f"| | {' | '.join(names)} | CLIP score |", f"|---|{'---|' * (len(cols) + 1)}"]
    for name, key in (("raw", "raw"), (f"reranked (best of {r['samples_per_prompt']})", "reranked")):
        lines.append(f"| {name} | " + " | ".join(f"{r[key][c]:.1%}" for c in cols)
                     + f" | {r['clip_score'][key]:.3f} |")
    a = r["clip_alone"]
    lines.append("| (a) CLIP alone: text picks its scene over the hard negatives | "
                 + " | ".join(f"{a[c]['all']:.1%}" for c in cols[:-1]) + f" | {a['overall']:.1%} | |")
    lines += ["", *_by_negative(a)]
    if "failures" in r:
        lines += [f"wrong raw samples, {CATEGORY_NAMES[c]}: " + (", ".join(
            f"{FAILURE_NAMES[w]} {v:.1%}" for w, v in r["failures"][c].items()) or "none") for c in CATEGORIES]
    d = r["diversity"]["cells"]
    lines.append(f"cells the objects take: {d['distinct_mean']:.2f} of {d['of']} per prompt on average "
                 f"(min {d['distinct_min']}; " + ", ".join(f"{CATEGORY_NAMES[c]} {v:.2f}"
                                                           for c, v in d["per_category"].items()) + ")")
    lines.append(f"text-image gap: mean cosine {r['text_image_cosine']:.3f} between a prompt's text embedding "
                 "and the image embedding of a render that satisfies it")
    lines.append(f"{r['prompts_per_category']} prompts per category x {r['samples_per_prompt']} samples "
                 f"({r['cond_source']} condition, guidance {r['cfg_scale']}) in {r['sampling_seconds']:.0f} s")
    if "refine" in r:
        lines += ["", refine_markdown(r["refine"], cols, names)]
    return "\n".join(lines)
