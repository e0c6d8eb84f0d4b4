"""models/dropout.py: the CPU dropout mask from 16-bit draws, and attention with it."""
import math

import pytest
import torch
import torch.nn.functional as F

from models.dropout import Dropout, attention, attention_with_dropout, dropout, keep_mask
from models.gpt import GPT, GPTConfig


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_frequency_and_independence(p):
    torch.manual_seed(0)
    n = 1 << 22
    mask, scale = keep_mask((n,), p)
    k = round(p * 65536)
    q = 1 - k / 65536
    assert mask.dtype == torch.bool and mask.shape == (n,)
    assert scale == pytest.approx(1 / q, rel=1e-12)
    sd = math.sqrt(q * (1 - q) / n)
    assert abs(mask.float().mean().item() - q) < 6 * sd
    # The four 16-bit draws of one 64-bit number, and neighbours across numbers, are independent:
    # P(both kept) = q^2 for lags 1..4 (a repeated or shared chunk would give q).
    m = mask.float()
    for lag in (1, 2, 3, 4):
        both = (m[:-lag] * m[lag:]).mean().item()
        assert abs(both - q * q) < 6 * math.sqrt(q * q * (1 - q * q) / n)


def test_keep_mask_edges_and_seed():
    mask, scale = keep_mask((3, 5, 7), 0.0)                   # odd size: the last 64-bit draw is partial
    assert mask.shape == (3, 5, 7) and mask.all() and scale == 1.0
    torch.manual_seed(3)
    a, _ = keep_mask((1001,), 0.3)
    torch.manual_seed(3)
    b, _ = keep_mask((1001,), 0.3)
    assert torch.equal(a, b)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError):
            keep_mask((4,), bad)
        with pytest.raises(ValueError):
            Dropout(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_values_gradient_and_expectation(dtype):
    torch.manual_seed(0)
    x = (torch.rand(64, 1024) + 0.5).to(dtype).requires_grad_()
    y = dropout(x, 0.25)
    assert y.dtype == dtype and y.shape == x.shape
    kept = y != 0
    scale = 65536 / (65536 - round(0.25 * 65536))
    torch.testing.assert_close(y[kept], (x[kept].float() * scale).to(dtype))
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    y.sum().backward()
    # d y / d x is the mask times the scale: the same elements as the forward kept.
    torch.testing.assert_close(x.grad, (kept.to(dtype) * scale).to(dtype))
    # Unbiased: the mean over many draws approaches x.
    z = torch.stack([dropout(x.detach().float(), 0.25) for _ in range(400)]).mean(0)
    assert (z - x.detach().float()).abs().mean().item() < 0.05


def test_dropout_identity_when_off():
    x = torch.randn(10, 10)
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0) is x
    d = Dropout(0.5).eval()
    assert d(x) is x
    assert Dropout(0.5).train()(x).eq(0).any()
    assert "p=0.5" in repr(Dropout(0.5))


@pytest.mark.parametrize("causal", [True, False])
def test_attention_with_dropout_at_zero_is_sdpa(causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(attention_with_dropout(q, k, v, 0.0, causal), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention(q, k, v, is_causal=causal), ref)


def test_attention_dropout_drops_weights_not_rows():
    # With dropout the output is (mask * softmax / (1 - p)) @ v; with v the identity, the output *is* the
    # dropped weights: zeros where dropped, softmax / (1 - p) elsewhere, causal zeros above the diagonal.
    torch.manual_seed(1)
    T = 32
    q, k = torch.randn(1, 2, T, 8), torch.randn(1, 2, T, 8)
    v = torch.eye(T).expand(1, 2, T, T)
    w = F.scaled_dot_product_attention(q, k, v, is_causal=True)          # softmax weights
    out = attention(q, k, v, is_causal=True, p=0.3)
    kept = out != 0
    assert not kept.triu(1).any()
    scale = 65536 / (65536 - round(0.3 * 65536))
    torch.testing.assert_close(out[kept], w[kept] * scale, rtol=1e-5, atol=1e-6)
    frac = kept.float().sum() / torch.ones(T, T).tril().sum() / 2
    assert 0.6 < frac.item() < 0.8


def test_gpt_training_forward_uses_it_and_is_seeded():
    cfg = GPTConfig(vocab_size=32, n_tokens=16, n_layer=2, n_head=2, n_embd=32, cond_dim=8, dropout=0.2)
    torch.manual_seed(0)
    model = GPT(cfg)
    tokens, cond = torch.randint(0, 32, (3, 16)), torch.randn(3, 8)
    model.train()
    torch.manual_seed(5)
    a = model(tokens, cond)
    torch.manual_seed(5)
    b = model(tokens, cond)
    c = model(tokens, cond)
    assert torch.equal(a, b) and not torch.equal(b, c)
    model.eval()
    e = model(tokens, cond)
    assert not torch.allclose(a, e)
    assert torch.equal(e, model(tokens, cond))
    assert sum(isinstance(m, Dropout) for m in model.modules()) == 1 + 2 * cfg.n_layer
