"""What a CLIP image embedding says of a scene, read by probes: the decomposition's question "is it in the
condition at all?", asked without any generator.

The language-free GPT sees a scene only through its CLIP image embedding. A probe trained on (embedding,
scene) pairs of the *unlabeled* scenes (the GPT's split) and tested on held-out ones tells whether what the
judge asks for can be read from that embedding:

- objects: the multiset of kinds, i.e. how many objects of each of the 32 (colour, shape) kinds
  (0 to 4; one 5-way classification per kind); a scene is right when all 32 counts are. This is what the
  single, two-object, counting and colour-attribution categories need.
- cells: the kind in each of the 9 grid cells, or none (one 33-way classification per cell); right when
  all 9 are. This is what relative position needs (and more).
- occupied: from the same reader, whether the n cells it finds likeliest occupied are the scene's n
  (n, the number of objects, given): where the objects are, whatever their kinds (chance for one object:
  1 in 9).

Each is read twice: by a linear map (what the GPT's one linear projection of the embedding can pass on
directly) and by an MLP (two GELU layers of 512): readable at all, by a small network. Reported per object
count and over the test scenes.

    python -m evaluation.scenes_probe --clip pretrained/scenes/clip.safetensors
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from datasets.scenes import COLORS, MAX_OBJECTS, SHAPES, SceneObject, ScenesDataset
from evaluation.scenes_eval import N_CELLS, encode_renders

N_KINDS = len(COLORS) * len(SHAPES)
READERS = ("linear", "mlp")
TARGETS = ("objects", "cells")
LR = {"linear": 1e-2, "mlp": 1e-3}


def labels(scene_list: Sequence[Sequence[SceneObject]]) -> dict[str, torch.Tensor]:
    """objects (N, 32): count of each kind (color * 4 + shape); cells (N, 9): kind per cell, 32 = empty."""
    counts = torch.zeros(len(scene_list), N_KINDS, dtype=torch.long)
    cells = torch.full((len(scene_list), N_CELLS), N_KINDS, dtype=torch.long)
    for i, objects in enumerate(scene_list):
        for o in objects:
            k = o.color * len(SHAPES) + o.shape
            counts[i, k] += 1
            cells[i, o.row * 3 + o.col] = k
    return {"objects": counts, "cells": cells}


def reader(kind: str, dim: int, out: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(dim, out)
    return nn.Sequential(nn.Linear(dim, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, out))


def fit_and_test(x: torch.Tensor, y: torch.Tensor, classes: int, n_test: int, kind: str, steps: int,
                 seed: int) -> torch.Tensor:
    """Train a `kind` reader from x[:-n_test] to the per-head classes y[:-n_test] (N, heads) by
    cross-entropy; its log-probabilities on the test rows (n_test, heads, classes)."""
    torch.manual_seed(seed)
    heads = y.shape[1]
    net = reader(kind, x.shape[1], heads * classes)
    # Features standardised on the training rows (a CLIP embedding is unit-norm: its entries are ~0.1, and a
    # linear reader would need weights far larger than a few thousand small steps reach); a step size
    # that decays to 0 (cosine), so the readers end converged rather than noisy.
    mean, std = x[:-n_test].mean(0), x[:-n_test].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    opt = torch.optim.AdamW(net.parameters(), lr=LR[kind], weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    xs, ys = x[:-n_test], y[:-n_test]
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(xs), (256,), generator=g)
        loss = nn.functional.cross_entropy(net(xs[idx]).view(-1, classes), ys[idx].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return net(x[-n_test:]).view(n_test, heads, classes).log_softmax(-1)


def probe(embed: Callable[[list], torch.Tensor], n_train: int = 20000, n_test: int = 4000, steps: int = 3000,
          seed: int = 0, split: str = "unlabeled-train") -> dict:
    """{target: {reader: {"all": share of test scenes right, "1".."4": per object count}}} for the embeddings
    embed(scene_list) -> (N, D) of the first n_train + n_test scenes of `split`."""
    ds = ScenesDataset(split, n_train + n_test)
    scene_list = [ds.scene(i) for i in range(n_train + n_test)]
    x = embed(scene_list).float()
    ys = labels(scene_list)
    n_obj = np.array([len(s) for s in scene_list[-n_test:]])
    out: dict = {}

    def shares(ok: np.ndarray) -> dict:
        return {"all": float(ok.mean()), **{str(n): float(ok[n_obj == n].mean()) for n in range(1, MAX_OBJECTS + 1)
                                            if (n_obj == n).any()}}

    for target in TARGETS:
        classes = MAX_OBJECTS + 1 if target == "objects" else N_KINDS + 1
        y = ys[target][-n_test:]
        out[target] = {}
        for kind in READERS:
            logp = fit_and_test(x, ys[target], classes, n_test, kind, steps, seed)
            out[target][kind] = shares((logp.argmax(-1) == y).all(1).numpy())
            if target == "cells":  # where, whatever the kinds: the n cells likeliest occupied, n given
                occupied = (1 - logp[..., N_KINDS].exp()).argsort(1, descending=True)   # (n_test, 9)
                truth = y != N_KINDS
                ok = [bool(truth[i, occupied[i, :n]].all()) for i, n in enumerate(n_obj)]
                out["occupied"] = {**out.get("occupied", {}), kind: shares(np.array(ok))}
    return out


def clip_embedder(clip, batch_size: int = 500) -> Callable[[list], torch.Tensor]:
    @torch.no_grad()
    def embed(scene_list):
        return encode_renders(clip, scene_list, batch_size).cpu()
    return embed


def markdown(r: dict) -> str:
    counts = [k for k in r["objects"]["linear"] if k != "all"]
    lines = ["| read from the CLIP image embedding | reader | " + " | ".join(f"{n} object(s)" for n in counts)
             + " | all |", "|---|---|" + "---|" * (len(counts) + 1)]
    what = {"objects": "the objects (kinds and counts)", "cells": "every cell's kind (what is where)",
            "occupied": "which cells are occupied (where)"}
    for target in (*TARGETS, "occupied"):
        for kind in READERS:
            v = r[target][kind]
            lines.append(f"| {what[target]} | {kind} | " + " | ".join(f"{v[n]:.1%}" for n in counts)
                         + f" | {v['all']:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import json
    import time

    from engine.checkpoint import atomic_write
    from engine.cli import at_least
    from models.clip import load_clip

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", required=True, help="CLIP checkpoint or export (the one the GPT is conditioned on)")
    p.add_argument("--train", type=at_least(1), default=20000, help="unlabeled scenes the probes learn from")
    p.add_argument("--test", type=at_least(1), default=4000, help="held-out scenes they are tested on")
    p.add_argument("--steps", type=at_least(1), default=3000, help="AdamW steps of batch 256 per probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    t0 = time.time()
    r = probe(clip_embedder(load_clip(args.clip, "cpu")), args.train, args.test, args.steps, args.seed)
    r.update(clip=args.clip, train=args.train, test=args.test, steps=args.steps, seed=args.seed,
             seconds=time.time() - t0)
    print(markdown(r))
    print(f"({args.train} training and {args.test} held-out unlabeled scenes, {args.steps} steps per probe, "
          f"{r['seconds']:.0f} s)")
    if args.json:
        def write(tmp):
            with open(tmp, "w") as f:
                json.dump(r, f, indent=1)
        atomic_write(args.json, write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
