"""Text (or an image embedding) -> CLIP -> GPT candidates -> VQGAN -> CLIP re-ranking, in one object.

    pipe = TextToImage.from_paths(vqgan="...", gpt="...", clip="...")
    result = pipe("a red circle in the top left", n_candidates=16, keep=4, seed=0)
    result.images   # (keep, 3, H, W) in [-1, 1], best first;  result.scores: CLIP similarity to the text

evaluate.py and demo.py both sample through this class.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine import distributed as D
from models.clip import CLIP, load_clip
from models.convert import load_vqgan
from models.convert_gpt import load_gpt
from models.gpt import GPT
from models.vqgan import VQGAN


@dataclass
class Generation:
    images: torch.Tensor   # (K, 3, H, W) in [-1, 1], sorted by score when re-ranked
    scores: torch.Tensor   # (K,) cosine similarity between each image's CLIP embedding and the condition
    tokens: torch.Tensor   # (K, h, w)


class TextToImage:
    def __init__(self, vqgan: VQGAN, gpt: GPT, clip: CLIP, device: torch.device | str | None = None,
                 precision: str = "auto"):
        self.device = torch.device(device) if device else D.pick_device(None)
        self.vqgan = vqgan.to(self.device).eval().requires_grad_(False)
        self.gpt = gpt.to(self.device).eval().requires_grad_(False)
        self.clip = clip.to(self.device)
        grid = vqgan.cfg.grid_size
        if gpt.cfg.n_tokens != grid * grid or gpt.cfg.vocab_size != vqgan.cfg.n_codes:
            raise ValueError(f"the GPT writes {gpt.cfg.n_tokens} tokens of {gpt.cfg.vocab_size} codes; the "
                             f"VQGAN decodes {grid * grid} tokens of {vqgan.cfg.n_codes} codes")
        if gpt.cfg.cond_dim != clip.embed_dim:
            raise ValueError(f"the GPT takes {gpt.cfg.cond_dim}-d conditions; the CLIP gives {clip.embed_dim}-d")
        amp = D.autocast_dtype(precision, self.device) if self.device.type == "cuda" else None
        self._amp = amp

    @classmethod
    def from_paths(cls, vqgan: str, gpt: str, clip: str, device=None, precision: str = "auto",
                   use_ema: bool = True) -> "TextToImage":
        dev = torch.device(device) if device else D.pick_device(None)
        return cls(load_vqgan(vqgan), load_gpt(gpt, use_ema=use_ema), load_clip(clip, device=dev), dev, precision)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self._amp or torch.float32, enabled=self._amp is not None)

    @torch.no_grad()
    def sample_conds(self, conds: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None, cfg_scale: float = 1.0, seed: int = 0,
                     batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """One image per row of conds (B, D) -> (images (B, 3, H, W) in [-1, 1], tokens (B, h, w)); rows are
        sampled batch_size at a time from one seeded generator."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        side = self.vqgan.cfg.grid_size
        conds = conds.float().to(self.device)
        images, tokens = [], []
        for start in range(0, len(conds), batch_size):
            c = conds[start:start + batch_size]
            with self._autocast():
                t = self.gpt.sample(c, temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale,
                                    generator=g)
                x = self.vqgan.decode_indices(t.view(len(c), side, side))
            images.append(x.float().clamp(-1, 1))
            tokens.append(t.view(len(c), side, side))
        return torch.cat(images), torch.cat(tokens)

    def sample(self, cond: torch.Tensor, n: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
        """n candidates for one condition (D,) -> (images (n, 3, H, W), tokens (n, h, w))."""
        return self.sample_conds(cond.float().view(1, -1).expand(n, -1), **kw)

    @torch.no_grad()
    def generate(self, cond: torch.Tensor, n_candidates: int = 16, keep: int | None = None,
                 rerank: bool = True, **sample_kw) -> Generation:
        """Sample n_candidates for the condition (D,), score each by CLIP similarity to it, keep the best."""
        cond = cond.float().view(-1)
        images, tokens = self.sample(cond, n_candidates, **sample_kw)
        scores = self.clip.encode_image(images) @ cond.to(self.device)
        keep = keep or n_candidates
        order = scores.argsort(descending=True) if rerank else torch.arange(len(scores), device=scores.device)
        order = order[:keep]
        return Generation(images[order], scores[order], tokens[order])

    def __call__(self, prompt: str, n_candidates: int = 16, keep: int | None = None, **kw) -> Generation:
        return self.generate(self.clip.encode_text([prompt])[0], n_candidates, keep, **kw)
