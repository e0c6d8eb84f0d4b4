"""VQGAN training losses: pixel (L1/L2) + LPIPS perceptual + hinge GAN with taming's adaptive weight."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.errors import UserError

VGG16_FILE = "vgg16-397923af.pth"  # the name torchvision's model zoo caches VGG16 under


class MissingWeightsError(UserError, RuntimeError):
    """Raised with a one-line message when perceptual-loss weights are not on disk."""


def find_vgg16_weights(path: str | None = None) -> Path | None:
    """The VGG16 ImageNet weights LPIPS needs: an explicit path, else torchvision's hub cache."""
    if path:
        return Path(path) if Path(path).is_file() else None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    return cached if cached.is_file() else None


def build_lpips(vgg_path: str | None = None) -> nn.Module:
    """LPIPS(vgg) without any download: VGG16 weights from disk, LPIPS's linear heads from the package."""
    found = find_vgg16_weights(vgg_path)
    if found is None:
        where = vgg_path or str(Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE)
        raise MissingWeightsError(
            f"LPIPS needs VGG16 weights at {where} (torchvision's {VGG16_FILE}); "
            "put the file there or pass --lpips-vgg PATH, or train without it with --perceptual-weight 0")
    import lpips  # imported here: it is slow to import and only needed when the loss is on

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lpips passes torchvision's deprecated `pretrained=` argument
        model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    model.net.load_state_dict(_vgg_features(found, model.net.state_dict()), strict=True)
    return model.eval().requires_grad_(False)


def _vgg_features(path: Path, wanted: dict) -> dict:
    """lpips' VGG slices' state dict from torchvision's VGG16 file; MissingWeightsError (one line) when the
    file is not that (unreadable, another network, other shapes)."""
    from engine.checkpoint import CheckpointError, load

    def refuse(why: str) -> MissingWeightsError:
        return MissingWeightsError(f"{path} is not torchvision's VGG16 weights ({VGG16_FILE}): {why}; pass the "
                                   "right file with --lpips-vgg, or train without LPIPS with --perceptual-weight 0")

    try:
        state = load(path)
    except CheckpointError as e:
        raise refuse(str(e)) from None
    if not isinstance(state, dict):
        raise refuse(f"it holds a {type(state).__name__}, not a state dict")
    # lpips splits vgg16.features into five slices that keep the torchvision layer numbers as names.
    features = {k[len("features."):]: v for k, v in state.items() if isinstance(k, str) and k.startswith("features.")}
    mapped = {}
    for name, like in wanted.items():
        _, idx, param = name.split(".")
        value = features.get(f"{idx}.{param}")
        if not torch.is_tensor(value) or value.shape != like.shape:
            raise refuse(f"features.{idx}.{param} is {'missing' if value is None else 'of another shape'}")
        mapped[name] = value
    return mapped


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def _mean_across_ranks(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """taming's balance: ||grad nll|| / ||grad g_loss|| at the decoder's last layer.

    The gradients are averaged over ranks first, so every rank uses the weight one process would compute
    on the global batch (otherwise each rank would weigh its GAN term differently).
    """
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    nll_grad, g_grad = _mean_across_ranks(nll_grad), _mean_across_ranks(g_grad)
    w = torch.norm(nll_grad) / (torch.norm(g_grad) + 1e-4)
    return torch.clamp(w, 0.0, max_weight).detach()


class VQLoss(nn.Module):
    """Generator and discriminator objectives for one batch.

    generator: pixel + perceptual + codebook terms, plus adaptive_weight * disc_weight * (-D(x_rec)) once
    the step reaches disc_start. discriminator: hinge loss on real vs. reconstructed images.
    """

    def __init__(self, pixel: str = "l1", perceptual_weight: float = 1.0, disc_weight: float = 0.8,
                 disc_start: int = 0, codebook_weight: float = 1.0, lpips_vgg: str | None = None):
        super().__init__()
        self.pixel, self.perceptual_weight = pixel, perceptual_weight
        self.disc_weight, self.disc_start, self.codebook_weight = disc_weight, disc_start, codebook_weight
        self.perceptual = build_lpips(lpips_vgg) if perceptual_weight > 0 else None

    def pixel_loss(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        if self.pixel == "l1":
            return (x - x_rec).abs().mean()
        if self.pixel == "l2":
            return (x - x_rec).pow(2).mean()
        return (x - x_rec).abs().mean() + (x - x_rec).pow(2).mean()  # "l1+l2"

    def gan_active(self, step: int) -> bool:
        return self.disc_weight > 0 and step >= self.disc_start

    def generator_loss(self, x, x_rec, qloss, step: int, disc: nn.Module | None, last_layer):
        logs = {}
        rec = self.pixel_loss(x, x_rec)
        logs["loss/pixel"] = rec.detach()
        if self.perceptual is not None:
            p = self.perceptual(x.float(), x_rec.float()).mean()
            logs["loss/perceptual"] = p.detach()
            rec = rec + self.perceptual_weight * p
        loss = rec + self.codebook_weight * qloss
        logs["loss/codebook"] = qloss.detach()
        if disc is not None and self.gan_active(step):
            g_loss = -disc(x_rec).mean()
            w = adaptive_weight(rec, g_loss, last_layer) * self.disc_weight
            loss = loss + w * g_loss
            logs["loss/g"], logs["gan/adaptive_weight"] = g_loss.detach(), w
        logs["loss/total"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, disc: nn.Module, x, x_rec):
        # One forward over real and fake together: a single DDP call, and the same result as two.
        logits = disc(torch.cat([x, x_rec.detach()]))
        real, fake = logits.chunk(2)
        loss = hinge_d_loss(real, fake)
        return loss, {"loss/d": loss.detach(), "gan/logits_real": real.mean().detach(),
                      "gan/logits_fake": fake.mean().detach()}


def lpips_available(vgg_path: str | None = None) -> bool:
    return find_vgg16_weights(vgg_path) is not None


