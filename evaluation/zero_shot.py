"""The Shapes world's zero-shot test of a CLIP: how well it names each attribute of held-out images.

train_clip.py picks its best checkpoint by these accuracies. It lives here, not in models/clip.py, as it
needs the Shapes world's vocabulary (datasets/shapes.py) and models/ does not import datasets/.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from datasets import shapes
from models.clip import CLIP

ZERO_SHOT_ATTRIBUTES = ("color", "shape", "size", "position")
PROMPT_STYLES = ("single", "ensemble")


def _n_classes(attribute: str) -> int:
    return {"color": len(shapes.COLORS), "shape": len(shapes.SHAPES), "size": len(shapes.SIZES),
            "position": len(shapes.ROWS) * len(shapes.COLS)}[attribute]


def attribute_prompts(attribute: str, style: str = "single") -> list[list[str]]:
    """Per class of `attribute`, the prompts whose mean embedding stands for it.

    single:   one prompt naming only that attribute: "a red shape", "a circle", "a small shape",
              "a shape in the top left" (wordings the training captions never use for size and position).
    ensemble: the class named beside every colour and shape, as training captions always name those:
              "a small red circle", "a small orange circle", ... averaged (CLIP's prompt ensembling)."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; choose from {PROMPT_STYLES}")
    n_cols = len(shapes.COLS)

    def spec(k: int, color: int = 0, shape: int = 0) -> shapes.ShapeSpec:
        labels = {"color": color, "shape": shape, "size": 0, "row": 0, "col": 0}
        if attribute == "position":
            labels.update(row=k // n_cols, col=k % n_cols)
        else:
            labels[attribute] = k
        return shapes.ShapeSpec(**labels, side=0.0, cx=0.0, cy=0.0)

    out = []
    for k in range(_n_classes(attribute)):
        if style == "single":
            out.append([shapes.describe(spec(k), {attribute})])
            continue
        colors = [k] if attribute == "color" else range(len(shapes.COLORS))
        kinds = [k] if attribute == "shape" else range(len(shapes.SHAPES))
        named = {attribute, "color", "shape"}
        out.append([shapes.describe(spec(k, c, s), named) for c in colors for s in kinds])
    return out


@torch.no_grad()
def zero_shot_classifier(clip: CLIP, attribute: str, style: str = "single") -> torch.Tensor:
    """(n_classes, D) unit-norm class embeddings: the normalised mean of each class's prompt embeddings."""
    prompts = attribute_prompts(attribute, style)
    flat = clip.encode_text([p for ps in prompts for p in ps])  # (sum of prompts, D)
    rows, i = [], 0
    for ps in prompts:
        rows.append(flat[i:i + len(ps)].mean(0))
        i += len(ps)
    return F.normalize(torch.stack(rows), dim=-1)


def _targets(batch: dict, attribute: str) -> torch.Tensor:
    if attribute == "position":
        return batch["row"] * len(shapes.COLS) + batch["col"]
    return batch[attribute]


@torch.no_grad()
def zero_shot_counts(clip: CLIP, dataset, indices: Sequence[int] | None = None, styles=PROMPT_STYLES,
                     batch_size: int = 250) -> dict[str, torch.Tensor]:
    """Per prompt style, float64 [correct colour, shape, size, position, n images] over dataset[indices]
    (Shapes items with labels). Counts, so ranks can sum their shares before dividing."""
    indices = list(range(len(dataset))) if indices is None else list(indices)
    heads = {s: {a: zero_shot_classifier(clip, a, s) for a in ZERO_SHOT_ATTRIBUTES} for s in styles}
    counts = {s: torch.zeros(len(ZERO_SHOT_ATTRIBUTES) + 1, dtype=torch.float64) for s in styles}
    for start in range(0, len(indices), batch_size):
        batch = torch.utils.data.default_collate([dataset[i] for i in indices[start:start + batch_size]])
        emb = clip.encode_image(batch["image"])  # (B, D)
        for s in styles:
            for j, a in enumerate(ZERO_SHOT_ATTRIBUTES):
                pred = (emb @ heads[s][a].T).argmax(-1).cpu()
                counts[s][j] += (pred == _targets(batch, a)).sum().item()
            counts[s][-1] += len(emb)
    return counts


def accuracies(counts: torch.Tensor) -> dict[str, float]:
    """[correct per attribute..., n] -> {attribute: accuracy}."""
    n = max(1.0, counts[-1].item())
    return {a: counts[j].item() / n for j, a in enumerate(ZERO_SHOT_ATTRIBUTES)}


def zero_shot_accuracy(clip: CLIP, dataset, indices: Sequence[int] | None = None,
                       style: str = "single", batch_size: int = 250) -> dict[str, float]:
    """{color, shape, size, position: accuracy} of CLIP naming each attribute of Shapes images by
    nearest class embedding (8 colours, 4 shapes, 2 sizes, 9 grid cells)."""
    return accuracies(zero_shot_counts(clip, dataset, indices, (style,), batch_size)[style])
