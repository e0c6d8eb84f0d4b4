"""VQGAN of the taming-transformers family: encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder.

Module names follow taming-transformers exactly (``encoder.down.0.block.0.norm1``, ``mid.attn_1``,
``quantize.embedding`` ...), so a taming checkpoint loads as it is and a CLIP-GEN one after renaming
(see ``models/convert.py``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from models.quantizer import VectorQuantizer


@dataclass(frozen=True)
class VQGANConfig:
    resolution: int = 64            # training image side; the grid is resolution / 2**(len(ch_mult)-1)
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 64                    # base width; level i has ch * ch_mult[i] channels
    ch_mult: tuple = (1, 2, 2, 4)
    num_res_blocks: int = 2         # encoder blocks per level (the decoder has one more)
    attn_resolutions: tuple = (8,)  # feature-map sides at which a self-attention block follows each block
    z_channels: int = 64            # encoder output width, before quant_conv
    embed_dim: int = 32             # code vector width
    n_codes: int = 1024
    dropout: float = 0.0
    norm_eps: float = 1e-6          # GroupNorm eps (taming: 1e-6)
    norm_groups: int = 32           # GroupNorm groups (taming: 32); few channels per group keep colour
    beta: float = 0.25              # commitment weight
    l2_codes: bool = True           # l2-normalised code lookup
    restart_threshold: float = 0.0  # re-seed codes whose running count per batch falls below this
    # Side the network works at, 0 = resolution (no resizing): images are scaled by token_resolution /
    # resolution before the encoder and the decoder's output back, so token borders can fall where a power-of-
    # two grid of the image would not put them (the scenes world's cells are 21 px apart on a 64-px canvas).
    token_resolution: int = 0

    @property
    def work_resolution(self) -> int:
        return self.token_resolution or self.resolution

    @property
    def grid_size(self) -> int:
        return self.work_resolution // 2 ** (len(self.ch_mult) - 1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["token_resolution"]:  # absent unless used: configs, and so fingerprints of the shards
            del d["token_resolution"]  # pre-encoded with them, stay what they were before the field existed
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "VQGANConfig":
        known = {f for f in cls.__dataclass_fields__}
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
        return cls(**d)


PRESETS: dict[str, VQGANConfig] = {
    # 64x64 Shapes-world images -> 8x8 tokens; small enough to train on a laptop CPU.
    "shapes": VQGANConfig(resolution=64, ch=16, ch_mult=(1, 2, 4, 8), num_res_blocks=1,
                          attn_resolutions=(8,), z_channels=64, embed_dim=16, n_codes=512, norm_groups=4,
                          l2_codes=True, restart_threshold=0.01),
    # Scenes-world images (64 px, objects in a 3 x 3 layout of cells) -> 6 x 6 tokens, 2 x 2 per cell: the
    # network works at 48 px, where the f=8 grid's lines fall between the cells (cell centres 8.25, 24, 39.75 px
    # against 2 x 2-token blocks centred at 8, 24, 40), so no token holds parts of two objects, as the 8 x 8
    # grid at 64 px does. One token per cell (3 x 3 at f=16) reconstructed only ~50% of objects right after
    # 5000 steps: a conv decoder hardly places a shape inside a block that nearest upsampling made uniform.
    "scenes": VQGANConfig(resolution=64, token_resolution=48, ch=16, ch_mult=(1, 2, 4, 8), num_res_blocks=1,
                          attn_resolutions=(6,), z_channels=64, embed_dim=16, n_codes=512, norm_groups=4,
                          l2_codes=True, restart_threshold=0.01),
    # The CLIP-GEN / taming ImageNet size: 256x256 -> 16x16 tokens, 16384 codes.
    "f16-16384": VQGANConfig(resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                             attn_resolutions=(16,), z_channels=256, embed_dim=32, n_codes=16384,
                             l2_codes=True, restart_threshold=0.01),
}


def Normalize(channels: int, cfg: "VQGANConfig") -> nn.GroupNorm:
    # With one channel per group, GroupNorm is InstanceNorm: it rescales each channel on its own and so
    # erases the ratios between channels that carry colour. Narrow models want fewer groups.
    return nn.GroupNorm(num_groups=min(cfg.norm_groups, channels), num_channels=channels, eps=cfg.norm_eps,
                        affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, cfg: "VQGANConfig"):
        super().__init__()
        self.norm1 = Normalize(in_ch, cfg)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = Normalize(out_ch, cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1-conv projections as in taming."""

    def __init__(self, ch: int, cfg: "VQGANConfig"):
        super().__init__()
        self.norm = Normalize(ch, cfg)
        self.q, self.k, self.v = (nn.Conv2d(ch, ch, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head, sequence over positions.
        q, k, v = (t(h).reshape(B, 1, C, H * W).transpose(2, 3) for t in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C), as taming
        out = out.transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: taming's choice, kept for weights


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(ch: int, cfg: VQGANConfig) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(ch, ch, cfg)
    mid.attn_1 = AttnBlock(ch, cfg)
    mid.block_2 = ResnetBlock(ch, ch, cfg)
    return mid


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        n_levels = len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        res, in_mult = cfg.work_resolution, (1,) + tuple(cfg.ch_mult)
        self.down = nn.ModuleList()
        for i in range(n_levels):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            c_in, c_out = cfg.ch * in_mult[i], cfg.ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(c_in, c_out, cfg))
                c_in = c_out
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(c_out, cfg))
            if i != n_levels - 1:
                level.downsample = Downsample(c_out)
                res //= 2
            self.down.append(level)
        self.mid = _mid(c_out, cfg)
        self.norm_out = Normalize(c_out, cfg)
        self.conv_out = nn.Conv2d(c_out, cfg.z_channels, 3, padding=1)

    def forward(self, x):  # (B, 3, R, R) -> (B, z_channels, R/f, R/f)
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        n_levels = len(cfg.ch_mult)
        c = cfg.ch * cfg.ch_mult[-1]
        res = cfg.grid_size
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _mid(c, cfg)
        # Built deepest level first but stored by level index, as taming does (its keys say up.{level}).
        levels = [None] * n_levels
        for i in reversed(range(n_levels)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            c_out = cfg.ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(c, c_out, cfg))
                c = c_out
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(c, cfg))
            if i != 0:
                level.upsample = Upsample(c)
                res *= 2
            levels[i] = level
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(c, cfg)
        self.conv_out = nn.Conv2d(c, cfg.out_channels, 3, padding=1)

    def forward(self, z):  # (B, z_channels, h, w) -> (B, 3, h*f, w*f)
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGAN(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.quantize = VectorQuantizer(cfg.n_codes, cfg.embed_dim, beta=cfg.beta, l2_norm=cfg.l2_codes,
                                        restart_threshold=cfg.restart_threshold)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)
        self.nhwc = False  # see channels_last()

    def channels_last(self, enabled: bool = True) -> "VQGAN":
        """Store the convolution weights channels-last (NHWC) and encode channels-last inputs, so convolutions
        run oneDNN's / cuDNN's NHWC kernels. Measured on the 2-core CPU under bf16 autocast at f16-16384,
        256 px (bench/train_vqgan.py, the layouts interleaved): encoding 8 images 1.9x faster (6.2 -> 3.3 s), a
        generator + discriminator step 1.26x (11.7 -> 9.5 s); no gain at the 64-px `shapes` preset. The
        demo pipeline (decode only) does not use it. Values are the same up to summation order; the state
        dict's keys and shapes are unchanged (exports are written contiguous)."""
        self.nhwc = enabled
        self.to(memory_format=self.memory_format)
        return self

    @property
    def memory_format(self) -> torch.memory_format:
        """The layout channels_last() chose: what its training partners (discriminator, inputs) should use."""
        return torch.channels_last if self.nhwc else torch.contiguous_format

    def encode(self, x):
        """images (B, 3, R, R) in [-1, 1] -> (quantized (B, D, h, w), indices (B, h, w), vq loss, stats)."""
        if self.cfg.token_resolution:  # to the work side (any image size, scaled as `resolution` would be)
            size = [n * self.cfg.token_resolution // self.cfg.resolution for n in x.shape[-2:]]
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        if self.nhwc:
            x = x.contiguous(memory_format=self.memory_format)
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, quant):
        x = self.decoder(self.post_quant_conv(quant))
        if self.cfg.token_resolution:  # back from the work side
            size = [n * self.cfg.resolution // self.cfg.token_resolution for n in x.shape[-2:]]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    def decode_indices(self, indices):
        """token grid (B, h, w) of code indices -> images (B, 3, R, R) in about [-1, 1]."""
        return self.decode(self.quantize.embed(indices))

    def forward(self, x):
        quant, indices, qloss, stats = self.encode(x)
        return self.decode(quant), indices, qloss, stats

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight the adaptive GAN weight is measured at (taming: the decoder's conv_out)."""
        return self.decoder.conv_out.weight


def build_vqgan(preset: str = "shapes", **overrides) -> VQGAN:
    return VQGAN(replace(PRESETS[preset], **overrides))
