"""VQGAN model: shapes per preset, the encode/decode interface, taming key names, config round trip."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from models.quantizer import VectorQuantizer
from models.vqgan import PRESETS, AttnBlock, VQGAN, VQGANConfig

TINY = VQGANConfig(resolution=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                   z_channels=8, embed_dim=4, n_codes=32)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return VQGAN(dataclasses.replace(TINY, **kw))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_shapes(preset):
    """Encoder grid is cfg.grid_size, indices (B, g, g) in [0, n_codes), decoder returns (B, 3, R, R).

    The networks run on the meta device (shapes only, no arithmetic), so the 256x256 preset is instant;
    the quantizer, which has no meta kernel for bincount, runs for real on a tensor of the right shape.
    """
    cfg = PRESETS[preset]
    B, R, g = 2, cfg.resolution, cfg.grid_size
    assert g * cfg.downsample_factor == cfg.work_resolution
    with torch.device("meta"):
        model = VQGAN(cfg)
        h = model.quant_conv(model.encoder(torch.empty(B, 3, cfg.work_resolution, cfg.work_resolution)))
        assert h.shape == (B, cfg.embed_dim, g, g)
        assert model.decode(torch.empty(B, cfg.embed_dim, g, g)).shape == (B, 3, R, R)
        assert model.decode_indices(torch.zeros(B, g, g, dtype=torch.long)).shape == (B, 3, R, R)
    assert model.quantize.embedding.weight.shape == (cfg.n_codes, cfg.embed_dim)

    q = VectorQuantizer(cfg.n_codes, cfg.embed_dim, l2_norm=cfg.l2_codes).eval()
    z_q, idx, loss, _ = q(torch.randn(B, cfg.embed_dim, g, g))
    assert z_q.shape == (B, cfg.embed_dim, g, g) and idx.shape == (B, g, g) and loss.dim() == 0
    assert idx.min() >= 0 and idx.max() < cfg.n_codes


def test_token_resolution_resizes_inside_the_model():
    """token_resolution: the network works at that side (its grid follows it), images go in and come out at
    `resolution`; 0 (what configs written before it load as) changes nothing."""
    assert "token_resolution" not in TINY.to_dict()  # so a fingerprint of a file written before it is unchanged
    assert VQGANConfig.from_dict(TINY.to_dict()) == TINY
    assert TINY.work_resolution == TINY.resolution == 16 and TINY.grid_size == 8
    cfg = dataclasses.replace(TINY, resolution=16, token_resolution=12)
    assert cfg.work_resolution == 12 and cfg.grid_size == 6
    assert VQGANConfig.from_dict(cfg.to_dict()) == cfg
    torch.manual_seed(0)
    model = VQGAN(cfg).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        quant, idx, _, _ = model.encode(x)
        assert quant.shape == (2, 4, 6, 6) and idx.shape == (2, 6, 6)
        # what the encoder saw is the antialiased 12-px image
        small = F.interpolate(x, size=12, mode="bilinear", antialias=True, align_corners=False)
        torch.testing.assert_close(model.quantize(model.quant_conv(model.encoder(small)))[0], quant)
        rec = model.decode(quant)
        assert rec.shape == (2, 3, 16, 16)
        inner = model.decoder(model.post_quant_conv(quant))
        assert inner.shape == (2, 3, 12, 12)
        torch.testing.assert_close(rec, F.interpolate(inner, size=16, mode="bilinear", align_corners=False))
        # another image size is scaled the same way (32 px -> 24 px -> a 12 x 12 grid -> 32 px again) ...
        big = torch.rand(1, 3, 32, 32) * 2 - 1
        q32, idx32, _, _ = model.encode(big)
        assert idx32.shape == (1, 12, 12) and model.decode(q32).shape == (1, 3, 32, 32)
    # ... and without token_resolution nothing is resized, whatever the image size (a conv VQGAN encodes any)
    plain = tiny_model().eval()
    with torch.no_grad():
        assert plain.encode(torch.rand(1, 3, 24, 24) * 2 - 1)[1].shape == (1, 12, 12)


def test_scenes_preset_puts_one_cell_in_two_by_two_tokens():
    """The scenes preset's grid lines fall between the scenes world's cells: at the work side every object of
    every cell, at its largest size and jitter, lies inside the 2 x 2 tokens of its own cell."""
    from datasets.scenes import GRID, JITTER, SIDE_RANGE

    cfg = PRESETS["scenes"]
    assert cfg.grid_size == 6
    scale = cfg.work_resolution / cfg.resolution
    side = cfg.downsample_factor  # px of one token at the work side
    half = max(SIDE_RANGE) / 2 + JITTER  # the widest reach of an object from its cell's centre
    for k, c in enumerate(GRID):
        lo, hi = math.floor(c - half) * scale, math.ceil(c + half) * scale  # its whole-pixel hull, scaled
        assert 2 * k * side <= lo and hi <= 2 * (k + 1) * side, (c, lo, hi)


def test_shapes_preset_end_to_end_on_cpu():
    cfg = PRESETS["shapes"]
    torch.manual_seed(0)
    model = VQGAN(cfg).eval()
    x = torch.rand(2, 3, cfg.resolution, cfg.resolution) * 2 - 1
    with torch.no_grad():
        quant, idx, qloss, _ = model.encode(x)
        x_rec, idx2, _, _ = model(x)
    g = cfg.grid_size
    assert quant.shape == (2, cfg.embed_dim, g, g)
    assert idx.shape == (2, g, g) and idx.dtype == torch.long
    assert 0 <= idx.min() and idx.max() < cfg.n_codes
    assert x_rec.shape == x.shape and torch.isfinite(x_rec).all() and torch.isfinite(qloss)
    assert torch.equal(idx, idx2)


def test_decode_indices_equals_decode_of_encoded_quant():
    model = tiny_model().eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        quant, idx, _, _ = model.encode(x)
        a = model.decode(quant)
        b = model.decode_indices(idx)
    assert idx.shape == (2, TINY.grid_size, TINY.grid_size)
    assert torch.allclose(a, b, atol=1e-5)


def test_taming_key_names():
    keys = set(VQGAN(PRESETS["shapes"]).state_dict())
    for k in ["encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.down.0.block.0.conv1.weight",
              "encoder.down.0.downsample.conv.weight", "encoder.down.3.attn.0.q.weight",
              "encoder.down.1.block.0.nin_shortcut.weight", "encoder.mid.block_1.conv1.weight",
              "encoder.mid.attn_1.q.weight", "encoder.mid.attn_1.proj_out.weight", "encoder.norm_out.weight",
              "encoder.conv_out.weight", "decoder.conv_in.weight", "decoder.mid.block_2.norm2.bias",
              "decoder.up.0.block.0.conv1.weight", "decoder.up.0.block.1.conv2.weight",
              "decoder.up.3.attn.1.k.weight", "decoder.up.1.upsample.conv.weight", "decoder.conv_out.weight",
              "quantize.embedding.weight", "quant_conv.weight", "post_quant_conv.weight"]:
        assert k in keys, k
    # taming's layout: the lowest level has no downsample (encoder) / upsample (decoder) at the ends.
    assert not any(k.startswith("encoder.down.3.downsample") for k in keys)
    assert not any(k.startswith("decoder.up.0.upsample") for k in keys)
    # The decoder has one more block per level than the encoder.
    n_blocks = PRESETS["shapes"].num_res_blocks
    assert f"decoder.up.0.block.{n_blocks}.conv1.weight" in keys
    assert f"encoder.down.0.block.{n_blocks}.conv1.weight" not in keys


def test_last_layer_is_decoder_conv_out():
    model = tiny_model()
    assert model.last_layer is model.decoder.conv_out.weight


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_config_dict_round_trip(preset, tmp_path):
    cfg = dataclasses.replace(PRESETS[preset], restart_threshold=0.123)
    d = cfg.to_dict()
    assert isinstance(d["ch_mult"], list) and isinstance(d["attn_resolutions"], list)
    assert not any(isinstance(v, tuple) for v in d.values())
    back = VQGANConfig.from_dict(d)
    assert back == cfg
    assert isinstance(back.ch_mult, tuple) and back.grid_size == cfg.grid_size
    # A checkpoint stores the dict; it must load under weights_only=True and rebuild the same config.
    torch.save({"config": d}, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)["config"]
    assert VQGANConfig.from_dict(loaded) == cfg
    # Unknown keys (from a newer version) are ignored.
    assert VQGANConfig.from_dict({**d, "not_a_field": 1}) == cfg


def test_attn_block_matches_hand_computation():
    torch.manual_seed(0)
    C, H, W = 8, 3, 5
    attn = AttnBlock(C, VQGANConfig(norm_eps=1e-6))
    for p in attn.parameters():  # random affine and biases too, so every term matters
        p.data.normal_(0, 0.5)
    x = torch.randn(2, C, H, W)
    h = F.group_norm(x, min(32, C), attn.norm.weight, attn.norm.bias, eps=1e-6)
    q, k, v = (conv(h).reshape(2, C, H * W) for conv in (attn.q, attn.k, attn.v))  # (B, C, N)
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(C), dim=2)  # (B, N query, N key)
    out = torch.einsum("bij,bcj->bci", w, v).reshape(2, C, H, W)
    ref = x + attn.proj_out(out)
    assert torch.allclose(attn(x), ref, atol=1e-5)


def test_gradients_reach_encoder_through_quantizer():
    model = tiny_model()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    x_rec, _, _, _ = model(x)
    x_rec.pow(2).mean().backward()  # reconstruction only: the straight-through estimator must carry it
    for p in (model.encoder.conv_in.weight, model.quant_conv.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is None  # only the vq loss trains the codebook


def test_vq_loss_trains_codebook_and_encoder():
    model = tiny_model()
    _, _, qloss, _ = model(torch.rand(2, 3, 16, 16) * 2 - 1)
    qloss.backward()
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.decoder.conv_out.weight.grad is None


def test_channels_last_computes_the_same_and_keeps_the_state_dict(tmp_path):
    from engine.checkpoint import save_weights
    from models.convert import load_vqgan

    a = tiny_model(seed=3).eval()
    b = tiny_model(seed=3).eval().channels_last()
    assert b.nhwc and b.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not b.encoder.conv_in.weight.is_contiguous()
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16) * 2 - 1                      # plain NCHW input: encode converts it
    with torch.no_grad():
        qa, ia, la, _ = a.encode(x)
        qb, ib, lb, _ = b.encode(x)
        assert qb.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(qb, qa, rtol=1e-5, atol=1e-5)
        assert torch.equal(ia, ib)
        torch.testing.assert_close(b.decode(qb), a.decode(qa), rtol=1e-4, atol=1e-5)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # A channels-last state dict loads into a contiguous model and back, and channels_last(False) undoes it.
    c = tiny_model(seed=9)
    c.load_state_dict(sb)
    assert c.encoder.conv_in.weight.is_contiguous() and torch.equal(c.encoder.conv_in.weight, sa["encoder.conv_in.weight"])
    # The exporter's writer takes it as it is (safetensors needs contiguous tensors: it makes them so).
    save_weights(tmp_path / "v.safetensors", "vqgan", b.cfg.to_dict(), sb, dtype=None)
    d = load_vqgan(tmp_path / "v.safetensors")
    assert all(torch.equal(d.state_dict()[k], sa[k]) for k in sa)
    b.channels_last(False)
    assert not b.nhwc and b.encoder.conv_in.weight.is_contiguous()
