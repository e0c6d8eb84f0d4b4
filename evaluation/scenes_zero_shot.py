"""The scenes world's zero-shot test of a CLIP: does it name each held-out scene among every scene of the split?

Each scene's name is its canonical description, the groups of identical objects in a fixed order ("two red
circles and a blue square"); a scene is named right when, of all distinct names of the split's scenes, its
image embedding is nearest its own name's text embedding. The first 1000 scenes of captioned-val have 602
distinct names, with many near misses among them (the same kinds with another count, colours on other
shapes), so counting and colour binding must be right. train_clip.py --dataset scenes picks its best
checkpoint by the worst object count's accuracy. Relations are not named here (evaluate.py --world scenes
measures them).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from datasets import scenes
from models.clip import CLIP

SCENE_COUNTS = tuple(str(n) for n in range(1, scenes.MAX_OBJECTS + 1))  # accuracy keys: "1" ... "4"


def scene_name(objects: Sequence[scenes.SceneObject]) -> str:
    """The canonical description: groups sorted by (colour, shape) index, plain template."""
    return scenes.describe_groups(sorted(scenes.groups_of(objects)))


@torch.no_grad()
def scene_zero_shot_counts(clip: CLIP, dataset: scenes.ScenesDataset, indices: Sequence[int] | None = None,
                           batch_size: int = 250) -> torch.Tensor:
    """float64 (2, MAX_OBJECTS): [right, scenes] per object count over dataset[indices]; the candidates are
    the names of all of `dataset`'s scenes, whatever `indices` is, so ranks scoring shares of it can sum
    their counts."""
    names = sorted({scene_name(dataset.scene(i)) for i in range(len(dataset))})
    row = {name: k for k, name in enumerate(names)}
    text = torch.cat([clip.encode_text(names[i:i + batch_size]) for i in range(0, len(names), batch_size)])
    text = F.normalize(text.float(), dim=-1)  # (n_names, D)
    indices = list(range(len(dataset))) if indices is None else list(indices)
    counts = torch.zeros(2, scenes.MAX_OBJECTS, dtype=torch.float64)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        images = torch.stack([dataset[i]["image"] for i in chunk])
        pred = (F.normalize(clip.encode_image(images).float(), dim=-1) @ text.T).argmax(-1).cpu()  # (B,)
        for i, p in zip(chunk, pred.tolist()):
            objects = dataset.scene(i)
            counts[0, len(objects) - 1] += float(p == row[scene_name(objects)])
            counts[1, len(objects) - 1] += 1
    return counts


def scene_accuracies(counts: torch.Tensor) -> dict[str, float]:
    """(2, MAX_OBJECTS) counts -> {"1": ..., "4": accuracy per object count, "all": over every scene}."""
    out = {k: counts[0, j].item() / max(1.0, counts[1, j].item()) for j, k in enumerate(SCENE_COUNTS)}
    out["all"] = counts[0].sum().item() / max(1.0, counts[1].sum().item())
    return out
