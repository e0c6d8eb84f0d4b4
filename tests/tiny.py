"""The tiny random VQGAN, CLIP and GPT checkpoints several test modules build (one definition)."""
from dataclasses import replace
from pathlib import Path

import torch

from models.clip import build_open_clip
from models.gpt import build_gpt
from models.vqgan import VQGAN, VQGANConfig

TINY_VQGAN = VQGANConfig(resolution=64, ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, attn_resolutions=(),
                         z_channels=16, embed_dim=8, n_codes=32, norm_groups=4, l2_codes=True)
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def tiny_gpt(**over):
    """A 1-layer GPT that fits TINY_VQGAN's tokens and TINY_CLIP's embeddings (override any of it)."""
    kw = dict(vocab_size=TINY_VQGAN.n_codes, n_tokens=TINY_VQGAN.grid_size ** 2, cond_dim=TINY_CLIP["embed_dim"],
              n_layer=1, n_embd=64, n_head=2)
    return build_gpt("tiny", **{**kw, **over})


def write_tiny(root: Path, gpt: bool = True) -> Path:
    """root/vqgan.pt, root/clip.pt (and root/gpt.pt): random weights, seed 0, in that order."""
    torch.manual_seed(0)
    torch.save({"kind": "vqgan", "config": TINY_VQGAN.to_dict(), "model": VQGAN(TINY_VQGAN).state_dict()},
               root / "vqgan.pt")
    torch.save({"kind": "clip", "open_clip_config": TINY_CLIP, "model": build_open_clip(TINY_CLIP).state_dict()},
               root / "clip.pt")
    if gpt:
        model = tiny_gpt()
        torch.save({"kind": "gpt", "config": model.cfg.to_dict(), "model": model.state_dict()}, root / "gpt.pt")
    return root


# The CLIP-GEN GPT fixture (compat/clipgen_gpt_small.pt) writes 16 tokens (a 4x4 grid) of 64 codes from 32-d
# conditions: TINY_VQGAN at 32 px with 64 codes decodes them, TINY_CLIP gives the conditions.
CLIPGEN_MATE_VQGAN = replace(TINY_VQGAN, resolution=32, n_codes=64)


def write_clipgen_mates(root: Path) -> Path:
    """root/vqgan.pt and root/clip.pt (random, seed 0) that fit the CLIP-GEN GPT fixture."""
    torch.manual_seed(0)
    torch.save({"kind": "vqgan", "config": CLIPGEN_MATE_VQGAN.to_dict(),
                "model": VQGAN(CLIPGEN_MATE_VQGAN).state_dict()}, root / "vqgan.pt")
    torch.save({"kind": "clip", "open_clip_config": TINY_CLIP, "model": build_open_clip(TINY_CLIP).state_dict()},
               root / "clip.pt")
    return root


def tiny_flow(vqgan, **over):
    """A 1-layer flow prior over `vqgan`'s codes (TINY_VQGAN's grid) from TINY_CLIP's embeddings."""
    from models.flow import build_flow, vqgan_codebook

    kw = dict(n_tokens=vqgan.cfg.grid_size ** 2, cond_dim=TINY_CLIP["embed_dim"], l2_codes=vqgan.quantize.l2_norm,
              n_layer=1, n_embd=64, n_head=2)
    return build_flow("tiny", vqgan_codebook(vqgan), **{**kw, **over})
