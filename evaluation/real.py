"""evaluate.py on real captioned images: CLIP score against the captions, and FID to the real images.

    python evaluate.py --vqgan V --gpt G --clip C --dataset coco --data-path val2017 \
        --coco-annotations captions_val2017.json --prompts 1000 --samples 1 --fid

--prompts captioned images, spread evenly over the dataset's sorted order (the same ones on every run),
each at the VQGAN's resolution (shorter side resized, centre crop). For each, --samples images are drawn
from its caption's CLIP text embedding (--cond-source image: from the image's own CLIP embedding) through
the pipeline demo.py uses. Reports:

- CLIP score: cosine of each sample's CLIP image embedding with its caption's text embedding, the mean
  over all samples (raw) and over the one CLIP re-ranking keeps per caption; and the same cosine for the
  real images with their own captions, the reference a generator would reach by drawing the data;
- the Fréchet distance in CLIP image-embedding space between all samples and the real images;
- with --fid, FID between all samples and the real images, through torch-fidelity (evaluation/fid.py).

A folder's captions are sidecar text files: a.jpg's caption is a.txt beside it (the whole file, as in tar
shards); images without one are left out. COCO images take their first caption (lowest annotation id).
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from datasets import CocoCaptions, DataError, EvalTransform, ImageFolder
from evaluation.fid import fid, frechet_distance

REAL_DATASETS = ("folder", "coco")


class CaptionedFolder(ImageFolder):
    """The images under `root` that have a non-empty caption file beside them (a.jpg -> a.txt)."""

    def __init__(self, root: str | os.PathLike, transform):
        super().__init__(root, transform)  # DataError if the folder has no images
        keep, captions = [], []
        for i, path in enumerate(self.paths):
            text = os.path.splitext(os.fsdecode(path))[0] + ".txt"
            if os.path.isfile(text):
                with open(text, encoding="utf-8") as f:
                    caption = f.read().strip()
                if caption:
                    keep.append(i)
                    captions.append(caption)
        if not keep:
            raise DataError(f"no image under {self.root} has a caption beside it: for evaluation, a.jpg's "
                            f"caption is the text file a.txt in the same folder")
        self.paths = self.paths[keep]          # (num_captioned,) bytes
        self.captions = captions               # num_captioned str
        self.records = np.arange(len(keep), dtype=np.int64)

    def read(self, record: int):
        image, _ = super().read(record)
        return image, {"caption": self.captions[record]}


def load_captioned(kind: str, data_path: str | None, coco_annotations: str | None = None):
    """The captioned dataset evaluate.py reads (resolution is set later, by spread_subset)."""
    if not data_path:
        raise DataError(f"--dataset {kind} needs --data-path")
    placeholder = EvalTransform(1)
    if kind == "folder":
        return CaptionedFolder(data_path, placeholder)
    if kind == "coco":
        if not coco_annotations:
            raise DataError("--dataset coco needs --coco-annotations (a captions_*.json)")
        return CocoCaptions(data_path, coco_annotations, placeholder)
    raise DataError(f"unknown dataset {kind!r}; choose from {', '.join(REAL_DATASETS)}")


def spread_subset(data, n: int, resolution: int):
    """min(n, len) items spread evenly over the dataset (sorted file lists group similar images), centre
    crops of `resolution` pixels."""
    k = min(n, len(data))
    idx = np.unique(((np.arange(k) + 0.5) * len(data) / k).astype(np.int64))
    return data.subset(idx, EvalTransform(resolution))


def _uint8(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> uint8 on the CPU: a quarter of the memory, the pixels a PNG would hold."""
    return ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def evaluate_real(pipe, data, *, samples: int = 16, cond_source: str = "text", cfg_scale: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, temperature: float = 1.0, seed: int = 0,
                  batch_size: int = 128, fid_weights: str | None = None, fid_features=None,
                  do_fid: bool = False) -> dict:
    """The numbers above for every item of `data` (a captioned dataset at the VQGAN's resolution)."""
    per_batch = max(1, batch_size // samples)   # captions sampled together
    clip_raw, clip_best, clip_real, fake_feats, real_feats, fakes, reals = [], [], [], [], [], [], []
    skipped = 0
    t0 = time.time()
    for start in range(0, len(data), per_batch):
        items = [data[i] for i in range(start, min(len(data), start + per_batch))]
        skipped += sum(it["skipped"] for it in items)
        real = torch.stack([it["image"] for it in items]).to(pipe.device)      # (b, 3, R, R)
        text = pipe.clip.encode_text([it["caption"] for it in items])            # (b, D)
        real_emb = pipe.clip.encode_image(real)                                  # (b, D)
        cond = real_emb if cond_source == "image" else text
        images, _ = pipe.sample_conds(cond.repeat_interleave(samples, 0), temperature=temperature, top_k=top_k,
                                      top_p=top_p, cfg_scale=cfg_scale, seed=seed * 100_003 + start,
                                      batch_size=batch_size)                    # (b * samples, 3, R, R)
        feats = pipe.clip.encode_image(images)                                   # (b * samples, D)
        scores = (feats.view(len(items), samples, -1) * text[:, None]).sum(-1)   # (b, samples) cosines
        clip_raw += scores.flatten().tolist()
        clip_best += scores.max(1).values.tolist()   # re-ranking is always by the caption, as demo.py does
        clip_real += (real_emb * text).sum(-1).tolist()
        fake_feats.append(feats.cpu())
        real_feats.append(real_emb.cpu())
        if do_fid:
            fakes.append(_uint8(images))
            reals.append(_uint8(real))
    result = {
        "prompts": len(data), "samples_per_prompt": samples, "cond_source": cond_source, "cfg_scale": cfg_scale,
        "top_k": top_k, "top_p": top_p, "temperature": temperature, "seed": seed,
        "clip_score": {"raw": float(np.mean(clip_raw)), "reranked": float(np.mean(clip_best)),
                       "real": float(np.mean(clip_real))},
        "skipped_unreadable": skipped, "sampling_seconds": time.time() - t0,
    }
    if len(data) > 1:
        result["clip_fd"] = frechet_distance(torch.cat(fake_feats), torch.cat(real_feats))
        result["clip_fd_real_images"] = len(data)
    if do_fid:
        result["fid"] = fid(torch.cat(fakes), torch.cat(reals), weights=fid_weights, features=fid_features,
                            device=pipe.device)
        result["fid_features"] = "inception" if fid_features is None else type(fid_features).__name__
    return result


def markdown(r: dict) -> str:
    lines = ["| | CLIP score |", "|---|---|",
             f"| raw | {r['clip_score']['raw']:.3f} |",
             f"| reranked (best of {r['samples_per_prompt']}) | {r['clip_score']['reranked']:.3f} |",
             f"| real images (reference) | {r['clip_score']['real']:.3f} |", ""]
    if "clip_fd" in r:
        lines.append(f"Fréchet distance in CLIP space to {r['clip_fd_real_images']} real images: {r['clip_fd']:.4f}")
    if "fid" in r:
        name = "Inception" if r["fid_features"] == "inception" else f"features of {r['fid_features']}"
        lines.append(f"FID ({name}) to {r['prompts']} real images: {r['fid']:.2f}")
    if r.get("skipped_unreadable"):
        lines.append(f"{r['skipped_unreadable']} unreadable images skipped (the next readable one taken)")
    lines.append(f"{r['prompts']} captions x {r['samples_per_prompt']} samples ({r['cond_source']} condition, "
                 f"guidance {r['cfg_scale']}) in {r['sampling_seconds']:.0f} s")
    return "\n".join(lines)
