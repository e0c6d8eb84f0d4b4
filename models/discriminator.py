"""PatchGAN discriminator (pix2pix / taming's NLayerDiscriminator): one real/fake logit per patch."""
from __future__ import annotations

from torch import nn


def _norm(kind: str, ch: int) -> nn.Module:
    # GroupNorm by default: unlike BatchNorm it has no batch statistics, so real and fake images can share
    # one forward, and an N-process run computes exactly what one process computes on the same batch.
    if kind == "group":
        return nn.GroupNorm(min(32, ch), ch)
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "group"):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last feature layer keeps the resolution
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=norm == "none"),
                       _norm(norm, ndf * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init)

    def forward(self, x):  # (B, 3, R, R) -> (B, 1, r, r) patch logits
        return self.main(x)


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
