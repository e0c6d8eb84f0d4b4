"""Vector quantizer: nearest-code lookup, straight-through gradients, commitment loss.

Two things keep the codebook alive while training (a dead codebook is the classic VQGAN failure: a few
codes take every vector and the rest never move):

* ``l2_norm``: encoder outputs and codes are L2-normalised before the lookup (ViT-VQGAN's "factorised,
  l2-normalised codes"), so the distance is a cosine and no code can drift away from the data's scale;
* ``restart_threshold``: a code whose running assignment count falls below the threshold is re-seeded
  from a random encoder output of the current (global) batch, so unused codes come back where data is.

With both off the module is a plain Euclidean lookup, which is what taming-transformers and CLIP-GEN
checkpoints were trained with; the importers build it that way.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VectorQuantizer(nn.Module):
    def __init__(self, n_codes: int, dim: int, beta: float = 0.25, l2_norm: bool = False,
                 restart_threshold: float = 0.0, usage_decay: float = 0.99):
        super().__init__()
        self.n_codes, self.dim, self.beta = n_codes, dim, beta
        self.l2_norm = l2_norm
        self.restart_threshold = restart_threshold
        self.usage_decay = usage_decay
        self.embedding = nn.Embedding(n_codes, dim)  # name kept from taming: `quantize.embedding.weight`
        self.embedding.weight.data.uniform_(-1.0 / n_codes, 1.0 / n_codes)
        # Running count of assignments per code per batch; starts at 1 so new codes get a grace period.
        self.register_buffer("usage", torch.ones(n_codes))
        # Number of training updates so far: seeds the restart draw so that resume and every rank agree.
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.long))

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight  # (K, D)
        return F.normalize(w, dim=1) if self.l2_norm else w

    def lookup(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Indices of the nearest codes for vectors (N, D) already normalised if l2_norm."""
        # Always fp32, autocast or not: under bf16 autocast the einsum would round the distances to 8 bits
        # of mantissa and the argmin would pick other codes than an fp32 encode (and than the code that
        # trained an imported checkpoint) does.
        with torch.autocast(z_flat.device.type, enabled=False):
            cb = self.codebook().float()
            z_flat = z_flat.float()
            # ||z||^2 + ||e||^2 - 2 z.e, the same expansion taming uses, so imported checkpoints pick the
            # same codes as the code that trained them.
            d = (z_flat.pow(2).sum(1, keepdim=True) + cb.pow(2).sum(1)
                 - 2 * torch.einsum("nd,kd->nk", z_flat, cb))
            return d.argmin(dim=1)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for an index grid (B, h, w) -> (B, D, h, w)."""
        return rearrange(F.embedding(indices, self.codebook()), "b h w d -> b d h w")

    def forward(self, z: torch.Tensor):
        """z (B, D, h, w) -> (z_q (B, D, h, w), indices (B, h, w), loss, stats)."""
        B, D, h, w = z.shape
        z = z.float()
        if self.l2_norm:
            z = F.normalize(z, dim=1)
        z_flat = rearrange(z, "b d h w -> (b h w) d")
        indices = self.lookup(z_flat.detach())
        z_q = F.embedding(indices, self.codebook())  # (N, D)
        z_q = rearrange(z_q, "(b h w) d -> b d h w", b=B, h=h, w=w)
        # Codebook term pulls codes to the encoder; commitment term (beta) keeps the encoder near its code.
        loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z, z_q.detach())
        z_q = z + (z_q - z).detach()  # straight-through: the decoder's gradient flows to the encoder as is
        counts = torch.bincount(indices, minlength=self.n_codes).float()
        stats = {"perplexity": perplexity(counts), "batch_usage": (counts > 0).float().mean()}
        if self.training and self.restart_threshold > 0:
            err = (z_flat.detach() - rearrange(z_q.detach(), "b d h w -> (b h w) d")).pow(2).sum(1)
            self._update_and_restart(z_flat.detach(), err, counts)
        return z_q, indices.view(B, h, w), loss, stats

    @torch.no_grad()
    def _update_and_restart(self, z_flat: torch.Tensor, err: torch.Tensor, counts: torch.Tensor) -> None:
        """Re-seed codes whose running count fell below the threshold with encoder outputs drawn in
        proportion to their quantization error: the vectors the codebook serves worst. (Drawing uniformly
        would mostly pick the commonest content, e.g. plain background, where codes are not needed.)"""
        if _distributed():
            # Every rank must see the global batch so that codebooks stay identical across ranks, and a
            # run on N processes matches one process on the same global batch.
            dist.all_reduce(counts)
            z_flat, err = _all_gather_cat(z_flat), _all_gather_cat(err)
        self.usage.mul_(self.usage_decay).add_(counts, alpha=1 - self.usage_decay)
        self.n_updates += 1
        dead = (self.usage < self.restart_threshold).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        g = torch.Generator(device="cpu").manual_seed(int(self.n_updates.item()))
        weights = err.double().cpu() + 1e-12
        replace = dead.numel() > int((weights > 1e-12).sum())  # distinct vectors while there are enough
        pick = torch.multinomial(weights, dead.numel(), replacement=replace, generator=g).to(z_flat.device)
        self.embedding.weight.data[dead] = z_flat[pick].to(self.embedding.weight.dtype)
        self.usage[dead] = 1.0


def _all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of a code histogram: the effective number of codes in use."""
    p = counts / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


class CodeUsage:
    """Accumulates code histograms over an evaluation set: usage share and perplexity."""

    def __init__(self, n_codes: int):
        self.counts = torch.zeros(n_codes, dtype=torch.float64)

    def update(self, indices: torch.Tensor) -> None:
        self.counts += torch.bincount(indices.flatten().cpu(), minlength=len(self.counts)).double()

    def all_reduce(self) -> None:
        if _distributed():
            c = self.counts.to(torch.float64)
            backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            c = c.to(backend_device)
            dist.all_reduce(c)
            self.counts = c.cpu()

    def summary(self) -> dict:
        return {"usage": float((self.counts > 0).double().mean()),
                "perplexity": float(perplexity(self.counts))}
