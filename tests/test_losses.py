"""VQGAN losses: hinge GAN, taming's adaptive weight, the generator/discriminator objectives, LPIPS weights."""
import os
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

from models.discriminator import PatchDiscriminator
from models.losses import (VGG16_FILE, MissingWeightsError, VQLoss, adaptive_weight, build_lpips,
                           find_vgg16_weights, hinge_d_loss, lpips_available)
from tests.conftest import REPO


def test_hinge_d_loss_known_values():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - r) = 0, 0.5, 2   -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + f) = 0, 1, 2     -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    # Confident and right on both sides: no loss.
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0


def linear_decoder(seed=0):
    """A 'decoder' whose last layer is a Linear (N, 4) -> (N, 3), so gradients can be written by hand."""
    g = torch.Generator().manual_seed(seed)
    feat, x, a = torch.randn(10, 4, generator=g), torch.randn(10, 3, generator=g), torch.randn(10, 3, generator=g)
    last = nn.Linear(4, 3)
    return feat, x, a, last


def test_adaptive_weight_matches_hand_computation():
    feat, x, a, last = linear_decoder()
    x_rec = last(feat)
    nll = (x_rec - x).abs().mean()
    g_loss = -(a * x_rec).mean()
    w = adaptive_weight(nll, g_loss, last.weight)
    # d mean|W f - x| / dW = sign(W f - x)^T f / n ;  d -mean(a * W f) / dW = -a^T f / n
    n = x_rec.numel()
    grad_nll = torch.sign(x_rec - x).detach().T @ feat / n
    grad_g = -a.T @ feat / n
    expected = grad_nll.norm() / (grad_g.norm() + 1e-4)
    assert w.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not w.requires_grad
    assert last.weight.grad is None  # autograd.grad, not backward: nothing left in .grad
    (nll + w * g_loss).backward()  # the graph was retained for the real backward
    assert last.weight.grad is not None


def test_adaptive_weight_is_clamped():
    feat, x, a, last = linear_decoder()
    x_rec = last(feat)
    nll = (x_rec - x).abs().mean()
    assert adaptive_weight(nll, -(a * x_rec).mean(), last.weight, max_weight=1e-3).item() == pytest.approx(1e-3)


def test_pixel_losses():
    x, y = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 2.0)
    assert VQLoss("l1", perceptual_weight=0).pixel_loss(x, y).item() == pytest.approx(2.0)
    assert VQLoss("l2", perceptual_weight=0).pixel_loss(x, y).item() == pytest.approx(4.0)
    assert VQLoss("l1+l2", perceptual_weight=0).pixel_loss(x, y).item() == pytest.approx(6.0)


def test_gan_active_switches_at_disc_start():
    loss = VQLoss(perceptual_weight=0, disc_weight=0.8, disc_start=5)
    assert [loss.gan_active(s) for s in (0, 4, 5, 6, 10_000)] == [False, False, True, True, True]
    off = VQLoss(perceptual_weight=0, disc_weight=0.0, disc_start=0)
    assert not any(off.gan_active(s) for s in (0, 5, 10_000))


def conv_decoder(seed=0):
    torch.manual_seed(seed)
    last = nn.Conv2d(4, 3, 3, padding=1)
    feat, x = torch.randn(2, 4, 32, 32), torch.rand(2, 3, 32, 32) * 2 - 1
    return last, feat, x


def test_generator_loss_without_gan():
    last, feat, x = conv_decoder()
    fn = VQLoss("l1", perceptual_weight=0, disc_weight=0.5, disc_start=10, codebook_weight=2.0)
    disc = PatchDiscriminator(ndf=8).requires_grad_(False)
    x_rec, qloss = last(feat), torch.tensor(0.3)
    loss, logs = fn.generator_loss(x, x_rec, qloss, step=9, disc=disc, last_layer=last.weight)
    assert "loss/g" not in logs and "gan/adaptive_weight" not in logs
    assert loss.item() == pytest.approx((x - x_rec).abs().mean().item() + 2.0 * 0.3, rel=1e-6)
    assert logs["loss/total"].item() == pytest.approx(loss.item())
    # No discriminator given: no GAN term even past disc_start.
    _, logs = fn.generator_loss(x, x_rec, qloss, step=50, disc=None, last_layer=last.weight)
    assert "loss/g" not in logs


def test_generator_loss_with_gan_leaves_frozen_discriminator_untouched():
    last, feat, x = conv_decoder()
    fn = VQLoss("l1", perceptual_weight=0, disc_weight=0.5, disc_start=10)
    torch.manual_seed(1)
    disc = PatchDiscriminator(ndf=8).requires_grad_(False)
    x_rec, qloss = last(feat), torch.tensor(0.3)
    loss, logs = fn.generator_loss(x, x_rec, qloss, step=10, disc=disc, last_layer=last.weight)
    assert {"loss/g", "gan/adaptive_weight"} <= set(logs)

    g = -disc(x_rec).mean()
    pixel = (x - x_rec).abs().mean()
    w = adaptive_weight(pixel, g, last.weight) * 0.5
    assert logs["loss/g"].item() == pytest.approx(g.item(), rel=1e-5)
    assert logs["gan/adaptive_weight"].item() == pytest.approx(w.item(), rel=1e-5)
    assert loss.item() == pytest.approx((pixel + 0.3 + w * g).item(), rel=1e-5)

    loss.backward()
    assert all(p.grad is None for p in disc.parameters())
    with_gan = last.weight.grad.clone()
    # The GAN term does reach the generator: its gradient differs from the pixel-only one.
    last.weight.grad = None
    fn.generator_loss(x, last(feat), qloss, step=9, disc=disc, last_layer=last.weight)[0].backward()
    assert not torch.allclose(with_gan, last.weight.grad)


def test_discriminator_loss_one_forward_equals_two():
    torch.manual_seed(0)
    disc = PatchDiscriminator(ndf=16)  # default GroupNorm: no batch statistics
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_rec = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    loss, logs = VQLoss(perceptual_weight=0).discriminator_loss(disc, x, x_rec)
    real, fake = disc(x), disc(x_rec)
    assert torch.allclose(loss, hinge_d_loss(real, fake), atol=1e-6)
    assert logs["gan/logits_real"].item() == pytest.approx(real.mean().item(), abs=1e-6)
    assert logs["gan/logits_fake"].item() == pytest.approx(fake.mean().item(), abs=1e-6)
    loss.backward()
    assert x_rec.grad is None  # the discriminator step must not train the generator
    assert all(p.grad is not None for p in disc.parameters())


def test_patch_discriminator_output_shape():
    disc = PatchDiscriminator()
    assert disc(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)  # as taming's NLayerDiscriminator


# ---------------------------------------------------------------- LPIPS weights

def test_missing_vgg_path_is_a_one_line_error(tmp_path):
    path = tmp_path / "nowhere" / VGG16_FILE
    with pytest.raises(MissingWeightsError) as e:
        build_lpips(str(path))
    msg = str(e.value)
    assert "\n" not in msg and "--perceptual-weight 0" in msg and str(path) in msg
    assert not lpips_available(str(path))
    with pytest.raises(MissingWeightsError):
        VQLoss(perceptual_weight=1.0, lpips_vgg=str(path))
    assert VQLoss(perceptual_weight=0.0, lpips_vgg=str(path)).perceptual is None  # not needed: no error


def test_missing_vgg_in_hub_cache_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert find_vgg16_weights() is None
    with pytest.raises(MissingWeightsError) as e:
        build_lpips()
    msg = str(e.value)
    assert "\n" not in msg and "--perceptual-weight 0" in msg
    assert str(tmp_path / "checkpoints" / VGG16_FILE) in msg


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A stand-in for torchvision's vgg16-397923af.pth: random weights, the real `features.*` key layout.

    Built on the meta device and only the conv stack materialised: initialising VGG16's 100M-parameter
    classifier would cost seconds on this machine, and LPIPS uses only the features.
    """
    with torch.device("meta"):
        vgg = torchvision.models.vgg16(weights=None)
    features = vgg.features.to_empty(device="cpu")
    torch.manual_seed(0)
    for m in features:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.normal_(m.bias, 0, 0.01)
    path = tmp_path_factory.mktemp("vgg") / VGG16_FILE
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def lpips_model(vgg_file):
    return build_lpips(str(vgg_file))


def test_build_lpips_loads_vgg_features(vgg_file, lpips_model):
    saved = torch.load(vgg_file, weights_only=True)
    sd = lpips_model.net.state_dict()
    assert torch.equal(sd["slice1.0.weight"], saved["features.0.weight"])
    assert torch.equal(sd["slice5.28.bias"], saved["features.28.bias"])
    assert len(sd) == 26  # the 13 convs of VGG16, weight and bias each
    assert not lpips_model.training
    assert not any(p.requires_grad for p in lpips_model.parameters())


def test_lpips_distance(lpips_model):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    same = lpips_model(x, x.clone())
    diff = lpips_model(x, y)
    assert same.shape == diff.shape == (2, 1, 1, 1)
    assert torch.all(same.abs() < 1e-6)
    assert torch.all(diff > 1e-4)
    diff.sum().backward()  # frozen network, but a loss: the gradient must reach the reconstruction
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_vgg_found_in_torchvision_hub_cache(tmp_path, monkeypatch, vgg_file):
    cached = tmp_path / "checkpoints" / VGG16_FILE
    cached.parent.mkdir()
    cached.symlink_to(vgg_file)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert find_vgg16_weights() == cached
    assert lpips_available()
    # An explicit path wins over the cache, and a wrong explicit path does not fall back to it.
    assert find_vgg16_weights(str(vgg_file)) == vgg_file
    assert find_vgg16_weights(str(tmp_path / "missing.pth")) is None


def test_cli_without_vgg_weights_exits_with_one_line(tmp_path):
    torch_home = tmp_path / "torch_home"
    torch_home.mkdir()
    env = {**os.environ, "TORCH_HOME": str(torch_home)}
    cmd = [sys.executable, "train_vqgan.py", "--preset", "shapes", "--perceptual-weight", "1", "--max-steps", "1",
           "--out-dir", str(tmp_path / "out"), "--no-tensorboard", "--num-workers", "0", "--device", "cpu"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "--perceptual-weight 0" in last
    assert str(torch_home / "hub" / "checkpoints" / VGG16_FILE) in last
