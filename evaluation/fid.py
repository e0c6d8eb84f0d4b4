"""Fréchet distances between two image sets: in any feature space, and FID through torch-fidelity.

FID uses torch-fidelity's Inception (the TensorFlow FID network's weights, converted). Nothing here
downloads: the weights file must be on disk, either where torch-fidelity's own download would have put it
(torch's hub cache, `inception_cache_path()`) or at a path the caller gives (evaluate.py
--inception-weights). When it is not, one line says where to put it. The file is read once with
torch.load(weights_only=True) before torch-fidelity loads it (which it does with weights_only=False), so a
file holding anything but tensors is refused instead of unpickled.

`fid(..., features=module)` computes the same statistic with any feature network instead (the tests pass a
tiny conv net; also e.g. a CLIP image tower): the module takes (B, 3, H, W) float images in [-1, 1] and
returns (B, F) features, or anything that flattens to that.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import torch
from torch import nn

from engine.cli import UsageError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # the name torch-fidelity downloads it as
_names = itertools.count()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(Ca + Cb - 2 (Ca Cb)^1/2) between two sets of feature rows, in float64.
    tr((Ca Cb)^1/2) is the sum of the square roots of the eigenvalues of Ca^1/2 Cb Ca^1/2 (symmetric PSD)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(ca)
    sqrt_ca = (v * w.clamp(min=0).sqrt()) @ v.T
    mid = torch.linalg.eigvalsh(sqrt_ca @ cb @ sqrt_ca).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + ca.trace() + cb.trace() - 2 * mid)


def torch_fidelity():
    """The torch_fidelity module, or one line saying how to install it (its import downloads nothing)."""
    try:
        import torch_fidelity
    except ImportError:
        raise UsageError("--fid needs torch-fidelity (pip install -r requirements.txt) and its Inception "
                         "weights") from None
    return torch_fidelity


def inception_cache_path() -> Path:
    """Where torch-fidelity looks for (and would download) its Inception weights: torch's hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def inception_weights(path: str | os.PathLike | None = None) -> str:
    """The Inception weights file to use (`path`, else the hub cache's), checked to be a plain state dict.
    UsageError (one line) when it is missing or is not one: no download is ever attempted."""
    torch_fidelity()
    chosen = Path(path) if path else inception_cache_path()
    if not chosen.is_file():
        where = f"{chosen} does not exist" if path else f"no {INCEPTION_FILE} in {chosen.parent}"
        raise UsageError(f"FID needs torch-fidelity's Inception weights and {where}: download {INCEPTION_FILE} "
                         f"(torch-fidelity's v0.2.0 release) on a machine with internet and pass it with "
                         f"--inception-weights PATH, or put it in {chosen.parent}")
    try:
        state = torch.load(chosen, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one that holds code
        raise UsageError(f"{chosen} is not a plain Inception state dict ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:160]})") from None
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if not isinstance(fc, torch.Tensor) or tuple(fc.shape) != (1008, 2048):
        raise UsageError(f"{chosen} is not torch-fidelity's Inception state dict (no (1008, 2048) fc.weight)")
    return str(chosen)


class _Images(torch.utils.data.Dataset):
    """(N, 3, H, W) uint8, or float in [-1, 1] -> the uint8 (3, H, W) items torch-fidelity reads: the pixels
    a PNG would hold."""

    def __init__(self, x: torch.Tensor):
        self.x = x if x.dtype == torch.uint8 else ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def _register(module: nn.Module) -> str:
    """Register `module` with torch-fidelity under a fresh name (its registry instantiates a class by name)."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import register_feature_extractor

    class Features(FeatureExtractorBase):
        def __init__(self, name, features_list, **_):
            super().__init__(name, features_list)
            self.net = module

        @staticmethod
        def get_provided_features_list():
            return ("features",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "features"

        @staticmethod
        def can_be_compiled():
            return False

        def forward(self, x):  # (B, 3, H, W) uint8 -> ((B, F) float,)
            return (self.net(x.float() / 127.5 - 1).flatten(1).float(),)

    name = f"project-features-{next(_names)}"
    register_feature_extractor(name, Features)
    return name


def fid(fake: torch.Tensor, real: torch.Tensor, *, weights: str | None = None, features: nn.Module | None = None,
        device: torch.device | str = "cpu", batch_size: int = 64) -> float:
    """Fréchet distance between the feature statistics of two image sets (N, 3, H, W), uint8 or float in
    [-1, 1], computed by torch-fidelity: with its Inception (`weights`: a file inception_weights() checked;
    the FID), or with the `features` module. Float sets are quantised to 8 bits, as saved images would be."""
    tf = torch_fidelity()
    if len(fake) < 2 or len(real) < 2:
        raise UsageError(f"FID needs at least 2 images per set (got {len(fake)} generated, {len(real)} real)")
    kw = dict(input1=_Images(fake.cpu()), input2=_Images(real.cpu()), fid=True, verbose=False, cache=False,
              save_cpu_ram=True,  # no DataLoader workers: the images are already in memory
              cuda=torch.device(device).type == "cuda", batch_size=batch_size)
    if features is None:
        kw.update(feature_extractor="inception-v3-compat", feature_extractor_weights_path=weights or
                  inception_weights())
        return float(tf.calculate_metrics(**kw)["frechet_inception_distance"])
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    kw["feature_extractor"] = name = _register(features)
    try:
        return float(tf.calculate_metrics(**kw)["frechet_inception_distance"])
    finally:
        FEATURE_EXTRACTORS_REGISTRY.pop(name, None)
